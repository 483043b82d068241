"""Watch block-local training of the LayerNorm-before-head ResMLP go wrong (or not), step by step.

Every ``--every`` steps of the ordinary training loop it prints, on one held-out batch: each block's
gradient cosine against BP (``m.gradient_report``), the relative consistency error of the couplers
whose span ends at the output, and the mean norm of the residual stream at every fourth boundary.

Example:
    python benchmarks/stream_diag.py --steps 40
    python benchmarks/stream_diag.py --steps 40 --config '{"local_head_weight": 0}'
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F
from models import ResMLPLN

import hbll_compile as hc
from hbll_compile.data import load_mnist8k, make_loaders


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--blocks", type=int, default=16)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--config", type=json.loads, default={}, help="HBLLConfig fields as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    train, test = load_mnist8k(flatten=True)
    torch.manual_seed(0)
    m = hc.hbll_compile(ResMLPLN(args.width, 16), (train.tensors[0][:2],), blocks=args.blocks,
                        loss=F.cross_entropy, config=hc.HBLLConfig(**args.config))
    train_loader, test_loader = make_loaders(train, test, batch_size=128, seed=0)
    x_held, y_held = next(iter(test_loader))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    batches = itertools.chain.from_iterable(itertools.repeat(train_loader))  # as many epochs as --steps needs
    for step, (x, y) in enumerate(batches):
        if step % args.every == 0:
            report = m.gradient_report(x_held, target=y_held)
            with torch.no_grad():
                env, h, norms = m.environment(x_held), x_held, []
                for i in range(1, args.blocks + 1):
                    h = m.run_block(i, h, env)
                    norms.append(h.norm(dim=-1).mean().item())
            top = [c.consistency_error for c in report.couplers if c.span[1] == args.blocks]
            print(f"step {step}: block cosines {[round(b.cosine or 0, 2) for b in report.blocks]}")
            print(f"  output couplers' error {[round(e or 0, 2) for e in top]}; stream norm at boundaries "
                  f"4, 8, 12, 15: {[round(norms[i - 1]) for i in (4, 8, 12, 15)]}", flush=True)
        if step == args.steps:
            break
        opt.zero_grad(set_to_none=True)
        m.training_step(x, target=y)
        opt.step()


if __name__ == "__main__":
    main()
