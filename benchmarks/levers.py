"""Probe training-loop levers that the library does not expose: a schedule for the local-head weight λ,
a learning-rate warmup, and exact block inputs (the slow start of the wavefront pipeline).

Each run trains one network from the table's initialisation with the table's loop (AdamW 1e-3; MNIST:
batch 128, 5 epochs; char-GPT: ``charlm_gpt.train``, ``--steps``, 300 by default) and appends one JSON
row to ``--out``: held-out accuracy after every epoch, or the char-GPT's perplexity curve (every quarter
of the run).

- ``--head-schedule``: ``const`` (λ = 0.5 throughout, the default), ``lin`` (0.5 falling linearly to 0 at
  the last step) or ``epoch1`` (0.5 for the first fifth of the steps, then 0). λ changes by replacing
  ``m.config`` before each step; every other setting stays.
- ``--warmup K``: the learning rate rises linearly over the first K steps (MNIST only).
- Exact inputs: ``--config '{"inputs": "tree", "corrections": N}'``: N Parareal sweeps make tree-mode
  inputs equal to the exact chain's, an O(N)-deep diagnostic, not a training mode.

Example:
    python benchmarks/levers.py --network resmlp --head-schedule epoch1 --seed 0
    python benchmarks/levers.py --network resmlp --config '{"inputs": "tree", "corrections": 16}'
    python benchmarks/levers.py --network chargpt --blocks 8 --head-schedule lin --steps 1200
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import hbll_compile as hc
from hbll_compile.config import DEFAULT_HEAD_WEIGHT
from hbll_compile.data import load_mnist8k, make_loaders
from hbll_compile.runtime.trainer import evaluate

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from models import ResMLPLN  # noqa: E402

__all__ = ["head_weight", "main"]

MNIST_EPOCHS = 5


def head_weight(schedule: str, step: int, steps: int) -> float:
    """λ at ``step`` of ``steps`` under ``schedule`` (a weight of exactly 0 would drop the heads, so the
    schedules end at a negligible positive weight instead)."""
    if schedule == "const":
        return DEFAULT_HEAD_WEIGHT
    if schedule == "lin":
        return max(DEFAULT_HEAD_WEIGHT * (1 - step / steps), 1e-9)
    if schedule == "epoch1":
        return DEFAULT_HEAD_WEIGHT if step < steps // MNIST_EPOCHS else 1e-9
    raise ValueError(f"unknown head schedule {schedule!r}")


def _with_heads(config: dict) -> dict:
    """``config`` with local heads where they fit (``local_head_weight=None``) unless it says otherwise: the
    λ schedules need heads, and the library's default has none."""
    return {"local_head_weight": None, **config}


def _scheduled(schedule: str, steps: int) -> Callable[[hc.HBLLModel], None]:
    """A hook to call before each step: sets λ for the step it is about to run."""
    count = [0]

    def before_step(m: hc.HBLLModel) -> None:
        m.config = dataclasses.replace(m.config, local_head_weight=head_weight(schedule, count[0], steps))
        count[0] += 1

    return before_step


def _mnist(args: argparse.Namespace) -> dict:
    from mnist_resmlp import build_model

    train, test = load_mnist8k(flatten=True)
    torch.manual_seed(args.seed)
    net = ResMLPLN(width=256, depth=16) if args.network == "resmlp_ln" else build_model(width=256, depth=16)
    m = hc.hbll_compile(net, (train.tensors[0][:2],), blocks=args.blocks, loss=F.cross_entropy,
                        config=hc.HBLLConfig(objective=args.objective, seed=args.seed, **_with_heads(args.config)))
    train_loader, test_loader = make_loaders(train, test, batch_size=128, seed=args.seed)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    warm = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup) if args.warmup else 1.0)
    before_step = _scheduled(args.head_schedule, MNIST_EPOCHS * len(train_loader))
    accuracy = []
    for _ in range(MNIST_EPOCHS):
        m.train()
        for x, y in train_loader:
            if args.objective == "hbll":
                before_step(m)
            opt.zero_grad(set_to_none=True)
            m.training_step(x, target=y)
            opt.step()
            warm.step()
        accuracy.append(round(100 * evaluate(m, test_loader)["accuracy"], 2))
    return {"epoch_accuracy": accuracy}


def _chargpt(args: argparse.Namespace) -> dict:
    import charlm_gpt

    before_step = _scheduled(args.head_schedule, args.steps)
    step = hc.HBLLModel.training_step

    def scheduled_step(m: hc.HBLLModel, *inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        before_step(m)
        return step(m, *inputs, target=target)

    hc.HBLLModel.training_step = scheduled_step  # type: ignore[method-assign]  # charlm_gpt.train owns the loop
    gpt_args = charlm_gpt.parser().parse_args([
        "--steps", str(args.steps), "--blocks", str(args.blocks), "--seed", str(args.seed),
        "--eval-every", str(max(1, args.steps // 4)),
        "--config", json.dumps(_with_heads(args.config))])
    curve: list[tuple[int, float]] = []
    perplexity, _ = charlm_gpt.train(args.objective, gpt_args, curve)
    return {"perplexity": perplexity, "eval_perplexity": curve}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--network", choices=("resmlp", "resmlp_ln", "chargpt"), default="resmlp")
    p.add_argument("--objective", choices=("hbll", "bp"), default="hbll")
    p.add_argument("--blocks", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=300, help="char-GPT training steps")
    p.add_argument("--head-schedule", choices=("const", "lin", "epoch1"), default="const")
    p.add_argument("--warmup", type=int, default=0, help="MNIST: linear learning-rate warmup over K steps")
    p.add_argument("--config", type=json.loads, default={}, help="HBLLConfig fields as JSON")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "levers.jsonl"))
    args = p.parse_args(argv)
    if args.network == "chargpt" and args.warmup:
        p.error("--warmup is for the MNIST networks")
    torch.set_num_threads(1)
    result = _chargpt(args) if args.network == "chargpt" else _mnist(args)
    row = {k: v for k, v in vars(args).items() if k != "out"} | result
    print(json.dumps(row), flush=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
