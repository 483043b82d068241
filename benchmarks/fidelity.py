"""Gradient fidelity on MNIST-8k: train with default HBLL, then measure every block's local gradient
against its BP gradient (``HBLLModel.gradient_report``) on a fixed held-out batch.

Examples (the commands behind benchmarks/results/issue12_fidelity.md):
    python benchmarks/fidelity.py --model resmlp --blocks 8 16 --epochs 1
    python benchmarks/fidelity.py --model ln_head --blocks 16 --epochs 1
    python benchmarks/fidelity.py --model ln_head --blocks 16 --epochs 1 --config '{"output_tail": "block"}'

Each run appends one JSON line to ``--out`` (per-block cosines and norm ratios, per-coupler errors and
VJP cosines, the exact-path self-check, held-out accuracy, and the cosine trajectory recorded every
``--diagnose-every`` steps on the first training batch) and, with ``--png``, plots that trajectory.
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
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))


class GeluBlock(nn.Module):
    """A residual GELU MLP block with a 2x hidden layer and no inner normalisation."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(x)))


class LNHeadMLP(nn.Module):
    """The LN-before-head variant: stem, ``depth`` GeluBlocks, LayerNorm, linear head."""

    def __init__(self, width: int = 256, depth: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Linear(784, width)
        self.blocks = nn.Sequential(*[GeluBlock(width) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.stem(x.flatten(1)))))


def build(name: str) -> nn.Module:
    if name == "resmlp":
        from mnist_resmlp import build_model

        return build_model()  # ResMLP(width=256, depth=16), as in BENCHMARKS.md
    return LNHeadMLP()


def run(name: str, n: int, epochs: int, seed: int, config: dict[str, Any], every: int, batch: int) -> dict[str, Any]:
    import hbll_compile as hc
    from hbll_compile.data import load_mnist8k, make_loaders
    from hbll_compile.runtime.trainer import evaluate

    train, test = load_mnist8k(flatten=True)
    torch.manual_seed(seed)
    m = hc.hbll_compile(build(name), (train.tensors[0][:2],), blocks=n, loss=F.cross_entropy,
                        config=hc.HBLLConfig(seed=seed, **config))
    train_loader, test_loader = make_loaders(train, test, batch_size=128, seed=seed)
    start = time.perf_counter()
    history = m.fit(train_loader, epochs, torch.optim.AdamW(m.parameters(), lr=1e-3), progress=False,
                    diagnose_every=every)
    seconds = time.perf_counter() - start
    x, y = test.tensors[0][:batch], test.tensors[1][:batch]
    report = m.gradient_report(x, target=y)
    exact = m.gradient_report(x, target=y, paths="exact")
    print(report.table())
    return {
        "model": name, "blocks": n, "epochs": epochs, "seed": seed, "config": config, "batch": batch,
        "train_seconds": round(seconds, 1), "eval_accuracy": evaluate(m, test_loader)["accuracy"],
        "report": report.to_dict(),
        "exact_max_abs_cosine_error": max(abs(b.cosine - 1) for b in exact.blocks if b.cosine is not None),
        "trajectory": history["gradient_report"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("resmlp", "ln_head"), default="resmlp")
    parser.add_argument("--blocks", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default="{}", help="HBLLConfig overrides as JSON")
    parser.add_argument("--diagnose-every", type=int, default=10)
    parser.add_argument("--batch", type=int, default=512, help="held-out digits in the measured batch")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/fidelity.jsonl"))
    parser.add_argument("--png", default=None, help="plot each run's trajectory to PNG (suffixed _N{blocks})")
    args = parser.parse_args(argv)
    from hbll_compile.runtime.fidelity import plot_history

    for n in args.blocks:
        row = run(args.model, n, args.epochs, args.seed, json.loads(args.config), args.diagnose_every, args.batch)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        cosines = " ".join("-" if b["cosine"] is None else f"{b['cosine']:.3f}" for b in row["report"]["blocks"])
        print(f"{args.model} N={n} {args.config}: accuracy {100 * row['eval_accuracy']:.2f}%, mean cosine "
              f"{row['report']['mean_cosine']:.3f}; per block {cosines}; exact-path check "
              f"{row['exact_max_abs_cosine_error']:.1e}")
        if args.png:
            path = Path(args.png)
            plot_history({"gradient_report": row["trajectory"]}, str(path.with_stem(f"{path.stem}_N{n}")))


if __name__ == "__main__":
    main()
