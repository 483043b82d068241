"""Gradient fidelity on MNIST-8k: train with default HBLL, then measure every block's local gradient
against its BP gradient (``HBLLModel.gradient_report``) on a fixed held-out batch.

Examples (the commands behind benchmarks/results/issue12_fidelity.md):
    python benchmarks/fidelity.py --model resmlp --blocks 8 16 --epochs 1
    python benchmarks/fidelity.py --model ln_head --blocks 16 --epochs 1
    python benchmarks/fidelity.py --model ln_head --blocks 16 --epochs 1 --config '{"output_tail": "block"}'
    python benchmarks/fidelity.py --summarise benchmarks/results/issue12_fidelity.jsonl

Each run appends one JSON line to ``--out`` (per-block cosines and norm ratios, per-coupler errors and
VJP cosines, the exact-path self-check, held-out accuracy, and the cosine trajectory recorded every
``--diagnose-every`` steps on the first training batch) and, with ``--png``, plots that trajectory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

from models import ResMLPLN  # noqa: E402  (benchmarks/ is this script's own folder)


def build(name: str) -> nn.Module:
    if name == "resmlp":
        from mnist_resmlp import build_model

        return build_model()  # ResMLP(width=256, depth=16), as in BENCHMARKS.md
    return ResMLPLN()  # the same network as accuracy.py's resmlp_ln suite


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


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _whole_update_cosine(row: dict[str, Any]) -> float:
    from hbll_compile.runtime.fidelity import BlockFidelity, GradientReport

    blocks = tuple(BlockFidelity(**b) for b in row["report"]["blocks"])
    return GradientReport(blocks, (), "", "", "", 0.0, 0).global_cosine


def summarise(path: str) -> str:
    """Markdown tables over seeds: per setting, then per block, then by coupler count in the path."""
    rows = [json.loads(line) for line in open(path)]
    settings: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for row in rows:
        settings.setdefault((row["model"], row["blocks"], json.dumps(row["config"])), []).append(row)
    out = ["| model | N | config | seeds | held-out accuracy (%) | mean block cosine | min block cosine | "
           "whole-update cosine | exact-path check max abs(cos − 1) |", "|" + " --- |" * 9]
    for (model, n, config), group in settings.items():
        cosines = [[b["cosine"] for b in r["report"]["blocks"]] for r in group]
        out.append(f"| {model} | {n} | `{config}` | {', '.join(str(r['seed']) for r in group)} | "
                   f"{_mean_std([100 * r['eval_accuracy'] for r in group])} | "
                   f"{_mean_std([r['report']['mean_cosine'] for r in group])} | "
                   f"{_mean_std([min(c) for c in cosines])} | "
                   f"{_mean_std([_whole_update_cosine(r) for r in group])} | "
                   f"{max(r['exact_max_abs_cosine_error'] for r in group):.1e} |")
    out += ["", "Per-block cosine (mean over the seeds of each setting):", "",
            "| model | N | config | " + " | ".join(f"b{i}" for i in range(1, 17)) + " |",
            "| --- | --- | --- | " + " | ".join("---" for _ in range(16)) + " |"]
    for (model, n, config), group in settings.items():
        means = [statistics.mean(r["report"]["blocks"][i]["cosine"] for r in group) for i in range(n)]
        out.append(f"| {model} | {n} | `{config}` | " + " | ".join(f"{c:.2f}" for c in means)
                   + " | " * (16 - n) + " |")
    out += ["", "By the number of couplers in a block's path (mean cosine and norm ratio over blocks and seeds):",
            "", "| model | N | config | couplers in path: cosine (norm ratio) |", "| --- | --- | --- | --- |"]
    for (model, n, config), group in settings.items():
        by_count: dict[int, list[tuple[float, float]]] = {}
        for r in group:
            for b in r["report"]["blocks"]:
                count = sum(1 for a, e in b["path"] if e - a > 1)
                by_count.setdefault(count, []).append((b["cosine"], b["norm_ratio"]))
        cells = [f"{k}: {statistics.mean(c for c, _ in v):.2f} ({statistics.mean(r for _, r in v):.2f})"
                 for k, v in sorted(by_count.items())]
        out.append(f"| {model} | {n} | `{config}` | {'; '.join(cells)} |")
    out += ["", "Couplers (mean over seeds): relative consistency error / VJP cosine on random probes / VJP cosine "
            "along the BP gradient", "",
            "| model | N | config | couplers (a, b]: error / probes / BP gradient |", "| --- | --- | --- | --- |"]
    for (model, n, config), group in settings.items():
        spans = [tuple(c["span"]) for c in group[0]["report"]["couplers"]]
        cells = []
        for j, (a, b) in enumerate(spans):
            error = statistics.mean(r["report"]["couplers"][j]["consistency_error"] for r in group)
            vjp = statistics.mean(r["report"]["couplers"][j]["vjp_cosine"] for r in group)
            along = statistics.mean(r["report"]["couplers"][j]["grad_vjp_cosine"] for r in group)
            cells.append(f"({a},{b}]: {error:.2f} / {vjp:.2f} / {along:.2f}")
        out.append(f"| {model} | {n} | `{config}` | {'; '.join(cells)} |")
    return "\n".join(out)


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
    parser.add_argument("--summarise", default=None, help="print markdown tables of a results file and stop")
    args = parser.parse_args(argv)
    if args.summarise:
        print(summarise(args.summarise))
        return
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
