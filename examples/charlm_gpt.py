"""A character-level GPT trained on Python source from the standard library, with BP and with HBLL.

Run from the repository root:
    python examples/charlm_gpt.py --steps 300 --blocks 4

The text is a fixed list of the CPython standard library's ``.py`` files (present on every machine),
split by position: the first 90% trains, the last 10% is held out (``hbll_compile.data.load_char_lm``).
It prints the held-out perplexity of each objective.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F
from torch import nn

import hbll_compile as hc
from hbll_compile.data import load_char_lm


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Layer(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharGPT(nn.Module):
    """GPT with learned positions and an output head tied to the token embedding."""

    def __init__(self, vocab: int, dim: int = 128, layers: int = 4, heads: int = 4, context: int = 64) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(context, dim)
        self.layers = nn.ModuleList(Layer(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.wte.weight
        for emb in (self.wte, self.wpe):
            nn.init.normal_(emb.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.ln_f(x))


def sequence_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean next-character cross-entropy over every position."""
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def build_model(vocab: int, layers: int = 4, dim: int = 128, context: int = 64) -> nn.Module:
    return CharGPT(vocab, dim=dim, layers=layers, context=context)


@torch.no_grad()
def perplexity(m: hc.HBLLModel, data: torch.utils.data.Dataset, batches: int = 20, batch_size: int = 64) -> float:
    m.eval()
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    losses = [sequence_loss(m(x), y).item() for (x, y), _ in zip(loader, range(batches))]
    m.train()
    return math.exp(sum(losses) / len(losses))


def train(objective: str, args: argparse.Namespace,
          curve: list[tuple[int, float]] | None = None) -> tuple[float, hc.HBLLModel]:
    """Train from the seed's initialisation (identical for every objective); return held-out perplexity.
    With ``curve`` and ``args.eval_every`` = k > 0, ``(step, held-out perplexity)`` is appended every k steps."""
    train_set, val_set, _ = load_char_lm(block_size=args.context)
    torch.manual_seed(args.seed)
    net = build_model(train_set.vocab_size, args.layers, args.dim, args.context)
    example = (train_set[0][0].unsqueeze(0).repeat(2, 1),)
    m = hc.hbll_compile(net, example, blocks=args.blocks, loss=sequence_loss,
                        config=hc.HBLLConfig(objective=objective, seed=args.seed,
                                             **(args.config if objective == "hbll" else {})))
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch, shuffle=True,
                                         generator=torch.Generator().manual_seed(args.seed))
    optimizer = torch.optim.AdamW(m.parameters(), lr=args.lr)
    lead = hc.default_lead(m)  # what fit does: blocks' weights predicted N/2 steps ahead under the wavefront
    step = 0
    m.train()
    while step < args.steps:
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            with hc.predicted_weights(m, optimizer, lead):
                m.training_step(x, target=y)
            optimizer.step()
            step += 1
            if curve is not None and args.eval_every and step % args.eval_every == 0:
                curve.append((step, perplexity(m, val_set)))
            if step >= args.steps:
                break
    return perplexity(m, val_set), m


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=0, help="held-out perplexity every k steps (0: at the end only)")
    p.add_argument("--config", type=json.loads, default={},
                   help='extra HBLLConfig fields for the HBLL run, as JSON, e.g. {"output_tail": "block"}')
    return p


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parser().parse_args(argv)
    results = {}
    for objective in ("bp", "hbll"):
        ppl, m = train(objective, args)
        results[objective] = ppl
        print(f"{objective}: held-out perplexity {ppl:.3f} after {args.steps} steps "
              f"(critical path {m.schedule.critical_path()})")
    return results


if __name__ == "__main__":
    main()
