"""Tree-VJP gradients (DESIGN §2) against the path loss, as a scratch training loop over a compiled model.

Tree-VJP replaces each block's path loss ``ℓ(P(i->N)(f_i(h_{i-1})), y)`` by one vector-Jacobian product
per tree node, top-down: ``g_N = ∂ℓ/∂h_N`` and ``g_i = J_v(h_i)^T g_b`` for the first node v = (i, b] of
block i's path; block i then backpropagates ``g_i`` from its own output. Work: N node VJPs per step
instead of about N·log2 N path evaluations. What the boundaries ``h_i`` are decides whether it is
O(log N) deep:

- ``path-exact`` / ``tvjp-exact``: the exact chain of the batch (an O(N) sequential forward; an oracle
  for the inputs, the same for both gradient modes);
- ``tvjp-delayed``: the wavefront pipeline's boundaries; the gradient waits until the batch has passed
  all N blocks, so every block trains on a batch N steps old (O(log N) per step);
- ``tvjp-tree``: the tree estimates after K Parareal corrections (O(log N) per step);
- ``bp``: end-to-end backprop in the same loop (reference).

Couplers train on their consistency term against the same boundaries in every mode. The runtime does
not offer Tree-VJP: BENCHMARKS.md ("Tree-VJP") records why, with this script's numbers.

Example:
    python benchmarks/tree_vjp.py --network resmlp_ln --width 256 --blocks 16 --modes tvjp-exact path-exact
    python benchmarks/tree_vjp.py --flops --blocks 16 64
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import hbll_compile as hc
from hbll_compile.data import load_mnist8k, make_loaders
from hbll_compile.runtime.fidelity import _tree_estimate  # the executor's tree-mode estimate, for one batch
from hbll_compile.runtime.trainer import evaluate

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from mnist_resmlp import ResMLP  # noqa: E402
from models import ResMLPLN  # noqa: E402

MODES = ("bp", "path-exact", "tvjp-exact", "tvjp-delayed", "tvjp-tree")


def tree_vjp(m: Any, h: list[torch.Tensor], out_n: torch.Tensor, y: torch.Tensor, env: dict) -> list[torch.Tensor]:
    """``g_1 .. g_N`` at boundaries ``h`` (``h[i]`` = h_i), from ``g_N = ∂ℓ(out_N, y)/∂out_N`` down."""
    n = m.tree.n_blocks
    leaf = out_n.detach().requires_grad_()
    m.score(leaf, y).backward(inputs=[leaf])  # backward(inputs=), not autograd.grad: FlopCounterMode
    g = {n: leaf.grad}
    for i in range(n - 1, 0, -1):
        node = m.tree.path(i)[0]
        h_i = h[i].detach().requires_grad_()
        m.run_node(node.id, h_i, env).backward(g[node.span[1]], inputs=[h_i])
        g[i] = h_i.grad
    return [g[i] for i in range(1, n + 1)]


def step(m: Any, mode: str, x: torch.Tensor, y: torch.Tensor, ring: list[dict[str, Any]]) -> None:
    """Fill ``.grad`` for one batch under ``mode`` (``ring``: the wavefront batches, newest first)."""
    n, env = m.tree.n_blocks, m.environment(x)
    if mode == "bp":
        m.score(m(x), y).backward()
        return
    if mode == "tvjp-delayed":
        ring.insert(0, {"x": x, "y": y, "env": env, "h": [x]})
        del ring[n + 1:]
        with torch.no_grad():  # block i advances the batch that entered i - 1 steps ago
            for i in range(1, min(n, len(ring)) + 1):
                entry = ring[i - 1]
                entry["h"].append(m.run_block(i, entry["h"][i - 1], entry["env"]))
        if len(ring) <= n:
            return
        x, y, env, h = ring[n]["x"], ring[n]["y"], ring[n]["env"], ring[n]["h"]
    elif mode == "tvjp-tree":
        h = _tree_estimate(m, x, env, "learned")
    else:
        with torch.no_grad():
            h = [x]
            for i in range(1, n + 1):
                h.append(m.run_block(i, h[-1], env))
    outs = [m.run_block(i, h[i - 1].detach(), env) for i in range(1, n + 1)]
    if mode == "path-exact":
        for i, out in enumerate(outs, 1):
            for node in m.tree.path(i):
                out = m.run_node(node.id, out, env)
            torch.autograd.backward(m.score(out, y), inputs=list(m.blocks[i - 1].parameters()))
    else:
        for out, g in zip(outs, tree_vjp(m, [*h[:n], outs[-1]], outs[-1], y, env)):
            out.backward(g)
    with torch.no_grad():  # a coupler's target: boundary b, or in tree mode its right child on the split estimate
        targets = {v.id: m.run_node(v.children[1], h[m.tree.nodes[v.children[0]].span[1]], env)
                   if mode == "tvjp-tree" else h[v.span[1]] for v in m.tree.internal_nodes}
    for v in m.tree.internal_nodes:
        loss = F.mse_loss(m.run_coupler(v.id, h[v.span[0]], env), targets[v.id])
        torch.autograd.backward(loss, inputs=list(m.couplers[str(v.id)].parameters()))


def build(network: str, width: int) -> torch.nn.Module:
    return ResMLPLN(width=width, depth=16) if network == "resmlp_ln" else ResMLP(width, 16)


def run(network: str, width: int, blocks: int, mode: str, seed: int, epochs: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    train, test = load_mnist8k(flatten=True)
    torch.manual_seed(seed)
    m = hc.hbll_compile(build(network, width), (train.tensors[0][:2],), blocks=blocks, loss=F.cross_entropy,
                        config=hc.HBLLConfig(seed=seed))
    train_loader, test_loader = make_loaders(train, test, batch_size=128, seed=seed)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    ring: list[dict[str, Any]] = []
    accuracy, start = [], time.perf_counter()
    for _ in range(epochs):
        m.train()
        for x, y in train_loader:
            opt.zero_grad(set_to_none=True)
            step(m, mode, x, y, ring)
            opt.step()
        accuracy.append(evaluate(m, test_loader)["accuracy"])
    return {"network": network, "width": width, "blocks": blocks, "mode": mode, "seed": seed,
            "epoch_accuracy": accuracy, "seconds": time.perf_counter() - start}


def flops(blocks: int, width: int = 256, batch: int = 64) -> dict[str, float]:
    """FLOPs of one step's gradient work per mode over eager BP's, on the pre-norm ResMLP (exact inputs,
    so the forward chain counts once in both gradient modes)."""
    x, y = torch.randn(batch, 784), torch.randint(0, 10, (batch,))
    net = ResMLP(width, blocks)
    m = hc.hbll_compile(net, (x[:2],), blocks=blocks, loss=F.cross_entropy)
    counts = {}
    for mode in ("bp", "path-exact", "tvjp-exact"):
        with FlopCounterMode(display=False) as counter:
            step(m, mode, x, y, [])
        counts[mode] = counter.get_total_flops()
    return {mode: c / counts["bp"] for mode, c in counts.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--network", choices=("resmlp", "resmlp_ln"), default="resmlp_ln")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--blocks", type=int, nargs="+", default=[16])
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--flops", action="store_true", help="only count FLOPs per step (ResMLP with depth = N)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tree_vjp.jsonl"))
    args = p.parse_args(argv)
    if args.flops:
        print("| N | path-exact / BP | tvjp-exact / BP |\n| --- | --- | --- |")
        for n in args.blocks:
            r = flops(n)
            print(f"| {n} | {r['path-exact']:.2f} | {r['tvjp-exact']:.2f} |", flush=True)
        return
    for n in args.blocks:
        for mode in args.modes:
            for seed in args.seeds:
                row = run(args.network, args.width, n, mode, seed, args.epochs)
                print(json.dumps(row), flush=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
