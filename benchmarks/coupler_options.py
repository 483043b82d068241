"""Coupler options (issue 13): held-out quality and gradient fidelity of one HBLL run per option.

Each run trains like ``accuracy.py`` does (same networks: the char-GPT, the MNIST CNN with BatchNorm,
``ResMLP(256, 16)``; same data, seeds and AdamW loop), then measures
``m.gradient_report`` on a fixed held-out batch: the mean block cosine, the whole-update cosine and the
per-block cosines against exact backprop.

Examples (the commands behind benchmarks/results/issue13_couplers.md):
    python benchmarks/coupler_options.py --suite chargpt --blocks 8 --steps 300 \
        --configs '{}' '{"coupler_mixing": "causal_conv"}' '{"coupler_mixing": "causal_attention"}' \
        '{"coupler_condition": "label"}'
    python benchmarks/coupler_options.py --suite cnn --blocks 4 --epochs 2 \
        --configs '{}' '{"coupler_condition": "label"}'

Run from the repository root with ``PYTHONPATH=.`` so that ``hbll_compile`` is this checkout's.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

from accuracy import MnistCNN  # noqa: E402  (benchmarks/ is this script's own folder)


def _chargpt(n: int, seed: int, steps: int, config: dict[str, Any]) -> tuple[Any, dict[str, Any], tuple]:
    from charlm_gpt import parser, train

    from hbll_compile.data import load_char_lm

    args = parser().parse_args(["--steps", str(steps), "--blocks", str(n), "--seed", str(seed),
                                "--config", json.dumps(config)])
    ppl, m = train("hbll", args)
    _, val_set, _ = load_char_lm(block_size=args.context)
    x, y = zip(*(val_set[i] for i in range(64)))
    return m, {"perplexity": ppl}, ((torch.stack(x),), torch.stack(y))


def _mnist(suite: str, n: int, seed: int, epochs: int, config: dict[str, Any]) -> tuple[Any, dict[str, Any], tuple]:
    from mnist_resmlp import build_model

    import hbll_compile as hc
    from hbll_compile.data import load_mnist8k, make_loaders
    from hbll_compile.runtime.trainer import evaluate

    train, test = load_mnist8k(flatten=suite == "resmlp")
    torch.manual_seed(seed)
    net = build_model(width=256, depth=16) if suite == "resmlp" else MnistCNN()
    m = hc.hbll_compile(net, (train.tensors[0][:2],), blocks=n, loss=F.cross_entropy,
                        config=hc.HBLLConfig(seed=seed, **config))
    train_loader, test_loader = make_loaders(train, test, batch_size=128, seed=seed)
    history = m.fit(train_loader, epochs, torch.optim.AdamW(m.parameters(), lr=1e-3), test_loader, progress=False)
    row = {"accuracy": evaluate(m, test_loader)["accuracy"], "epoch_accuracy": history["eval_accuracy"],
           "depth_report": m.depth_report(test_loader)}
    return m, row, ((test.tensors[0][:512],), test.tensors[1][:512])


def run(suite: str, n: int, seed: int, length: int, config: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(1)
    start = time.perf_counter()
    if suite == "chargpt":
        m, row, (x, y) = _chargpt(n, seed, length, config)
    else:
        m, row, (x, y) = _mnist(suite, n, seed, length, config)
    seconds = time.perf_counter() - start
    m.train()
    report = m.gradient_report(*x, target=y)
    return {"suite": suite, "blocks": n, "seed": seed, "length": length, "config": config, **row,
            "train_seconds": round(seconds, 1), "mean_cosine": report.mean_cosine,
            "global_cosine": report.global_cosine, "summary": report.summary(),
            "coupler_flops": [p.flops for p in m.coupler_plans]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=("chargpt", "cnn", "resmlp"), required=True)
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=300, help="training steps (chargpt)")
    p.add_argument("--epochs", type=int, default=2, help="training epochs (cnn, resmlp)")
    p.add_argument("--configs", nargs="+", default=["{}"], help="HBLLConfig overrides as JSON, one run each")
    p.add_argument("--out", default="/tmp/issue13_couplers.jsonl")
    args = p.parse_args(argv)
    for config in args.configs:
        row = run(args.suite, args.blocks, args.seed, args.steps if args.suite == "chargpt" else args.epochs,
                  json.loads(config))
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        metric = f"perplexity {row['perplexity']:.3f}" if "perplexity" in row else f"accuracy {row['accuracy']:.4f}"
        cosines = " ".join("-" if c is None else f"{c:.3f}" for c in row["summary"]["block_cosine"])
        print(f"{args.suite} N={args.blocks} seed {args.seed} {config}: {metric}; mean block cosine "
              f"{row['mean_cosine']:.3f}, whole-update {row['global_cosine']:.3f}; per block {cosines}; "
              f"{row['train_seconds']} s", flush=True)


if __name__ == "__main__":
    main()
