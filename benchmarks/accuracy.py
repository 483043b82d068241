"""Accuracy benchmarks: BP vs DGL vs HBLL on the same networks, same data, same loop, several seeds.

Every run builds the network from its seed, compiles it with ``hbll_compile`` under the objective
being measured, and trains it with ``AdamW(lr=1e-3)`` through ``m.training_step`` (exactly the user
loop). Results are appended as JSON lines and summarised as markdown tables (mean ± std over seeds),
with the depth report of each HBLL run.

Examples (the commands behind BENCHMARKS.md):
    python benchmarks/accuracy.py --suite resmlp --blocks 4 8 16 --seeds 0 1 2 --epochs 5
    python benchmarks/accuracy.py --suite cnn --blocks 4 8 --seeds 0 1 2 --epochs 5
    python benchmarks/accuracy.py --suite chargpt --blocks 4 --objectives bp hbll --seeds 0 --steps 600
    python benchmarks/accuracy.py --suite resmlp_ln --blocks 16 --objectives bp hbll --seeds 0 1 2 --epochs 5
    python benchmarks/accuracy.py --suite resmlp --summarise benchmarks/results/accuracy_resmlp.jsonl
    python benchmarks/accuracy.py --suite rowmnist --cell gru --layers 2 --blocks 4 --objectives bp hbll --epochs 3
    python benchmarks/accuracy.py --suite charlstm --blocks 4 --objectives bp tbptt hbll --steps 600
    python benchmarks/accuracy.py --suite adding_early --blocks 4 --objectives tbptt hbll --steps 2000

The recurrent suites (``RNN_SUITES``) compile over time and run ``benchmarks/rnn.py``'s runs with its
settings; its own command line has more options (sequence length, hidden size, batch, learning rate).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from models import MnistCNN, ResMLPLN  # noqa: E402


def _exact_spans(model: Any, node: int, h: torch.Tensor, env: dict) -> torch.Tensor:
    """Diagnostic stand-in for a coupler: the exact chain of the blocks it spans (O(N) depth)."""
    a, b = model.tree.nodes[node].span
    for i in range(a + 1, b + 1):
        h = model.run_block_frozen(i, h, env)
    return h


def _mnist_run(suite: str, objective: str, n: int, seed: int, epochs: int, config: dict,
               depth: int = 16, oracle: bool = False, width: int = 256) -> dict[str, Any]:
    import hbll_compile as hc
    from hbll_compile.data import load_mnist8k, make_loaders
    from hbll_compile.runtime.trainer import evaluate

    train, test = load_mnist8k(flatten=suite in ("resmlp", "resmlp_ln"))
    torch.manual_seed(seed)
    if suite == "resmlp":
        from mnist_resmlp import build_model

        net = build_model(width=256, depth=depth)
    elif suite == "resmlp_ln":
        net = ResMLPLN(width=width, depth=depth)
    else:
        net = MnistCNN()
    m = hc.hbll_compile(net, (train.tensors[0][:2],), blocks=n, loss=F.cross_entropy,
                        config=hc.HBLLConfig(objective=objective, seed=seed, **config))
    if oracle:
        m.run_coupler = lambda node, h, env: _exact_spans(m, node, h, env)
    train_loader, test_loader = make_loaders(train, test, batch_size=128, seed=seed)
    start = time.perf_counter()
    history = m.fit(train_loader, epochs, torch.optim.AdamW(m.parameters(), lr=1e-3), test_loader, progress=False)
    seconds = time.perf_counter() - start
    row = {"accuracy": evaluate(m, test_loader)["accuracy"], "train_seconds": seconds,
           "critical_path": m.schedule.critical_path(), "epoch_accuracy": history["eval_accuracy"]}
    if objective == "hbll":
        row["depth_report"] = m.depth_report(test_loader)
    return row


RNN_SUITES = ("rowmnist", "charlstm", "adding_early")
"""Over time (issue 11): row-by-row MNIST (batch 64, AdamW lr 2e-3), the char-level LSTM on the
standard-library corpus (T=128, hidden 128, batch 32, lr 3e-3) and the adding problem with both markers
in the first half (T=100, batch 128, lr 3e-3)."""


def _rnn_run(job: dict[str, Any]) -> dict[str, Any]:
    import rnn

    suite, objective, n, seed, config = job["suite"], job["objective"], job["blocks"], job["seed"], job["config"]
    if suite == "rowmnist":
        return rnn.run_one(job["cell"], objective, n, seed, job["epochs"], 64, 2e-3, config, job["layers"])
    if suite == "charlstm":
        return rnn.run_charlm(objective, n, seed, job["steps"], 128, 32, 3e-3, 128, config)
    return rnn.run_adding(objective, n, seed, job["steps"], 100, 128, 3e-3, config, early=True)


def _chargpt_run(objective: str, n: int, seed: int, steps: int, config: dict) -> dict[str, Any]:
    from charlm_gpt import parser, train

    args = parser().parse_args(["--steps", str(steps), "--blocks", str(n), "--seed", str(seed),
                                "--config", json.dumps(config)])
    start = time.perf_counter()
    ppl, m = train(objective, args)
    return {"perplexity": ppl, "train_seconds": time.perf_counter() - start,
            "critical_path": m.schedule.critical_path()}


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(1)
    if job["suite"] in RNN_SUITES:
        result = _rnn_run(job)
    elif job["suite"] == "chargpt":
        result = _chargpt_run(job["objective"], job["blocks"], job["seed"], job["steps"], job["config"])
    else:
        result = _mnist_run(job["suite"], job["objective"], job["blocks"], job["seed"], job["epochs"], job["config"],
                            job["depth"], job["oracle"], job.get("width", 256))
    return {**job, **result}


def _label(row: dict[str, Any]) -> str:
    label = (f"{row['cell']} " if row["suite"] == "rowmnist" else "") + row["objective"]
    label += " (oracle couplers)" if row.get("oracle") else ""
    label += f", width {row['width']}" if row.get("width", 256) != 256 else ""
    return label + (f", depth {row['depth']}" if row["suite"] == "resmlp" and row.get("depth", 16) != 16 else "")


def _metric(row: dict[str, Any]) -> str:
    """The held-out score a row reports: accuracy, perplexity (language models) or test MSE (adding)."""
    return next(key for key in ("accuracy", "perplexity", "test_mse") if key in row)


def summarise(rows: list[dict[str, Any]]) -> str:
    """Markdown: one row per (suite, N, objective, config) with mean ± std over seeds."""
    metric = _metric(rows[0]) if rows else "accuracy"
    digits = 4 if metric == "test_mse" else 2
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["suite"], r["blocks"], _label(r), json.dumps(r["config"])), []).append(r)
    lines = [f"| suite | N | objective | config | {metric} | seeds | critical path | train s/run |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (suite, n, objective, config), rs in sorted(groups.items()):
        values = [r[metric] * (100 if metric == "accuracy" else 1) for r in rs]
        spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
        lines.append(f"| {suite} | {n} | {objective} | {config if config != '{}' else '-'} | "
                     f"{statistics.mean(values):.{digits}f}{spread} | {len(rs)} | {rs[0]['critical_path']} | "
                     f"{statistics.mean(r['train_seconds'] for r in rs):.0f} |")
    depth_rows = [r for r in rows if r.get("depth_report")]
    if depth_rows:
        width = max(len(r["depth_report"]) for r in depth_rows)
        lines += ["", "Depth report of the HBLL runs (mean accuracy over seeds, MFLOPs per sample; the last "
                  "depth of each row is the exact chain):", "",
                  "| suite | N | config | " + " | ".join(f"depth {d}" for d in range(width)) + " |",
                  "| --- | --- | --- |" + " --- |" * width]
        by_n: dict[tuple, list[dict]] = {}
        for r in depth_rows:
            by_n.setdefault((r["suite"], r["blocks"], r.get("width", 256), json.dumps(r["config"])), []).append(r)
        for (suite, n, net_width, config), rs in sorted(by_n.items()):
            cells = []
            for d in range(width):
                if d < len(rs[0]["depth_report"]):
                    acc = statistics.mean(r["depth_report"][d]["accuracy"] for r in rs) * 100
                    cells.append(f"{acc:.1f}% ({rs[0]['depth_report'][d]['flops'] / 1e6:.2f})")
                else:
                    cells.append("")
            config = (config if config != "{}" else "-") + (f", width {net_width}" if net_width != 256 else "")
            lines.append(f"| {suite} | {n} | {config} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=("resmlp", "resmlp_ln", "cnn", "chargpt", *RNN_SUITES), required=True)
    p.add_argument("--blocks", type=int, nargs="+", default=[8])
    p.add_argument("--objectives", nargs="+", default=["bp", "dgl", "hbll"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--steps", type=int, default=600, help="training steps (chargpt, charlstm, adding_early)")
    p.add_argument("--cell", choices=("gru", "lstm"), default="gru", help="recurrent cell (rowmnist)")
    p.add_argument("--layers", type=int, default=1, help="recurrent layers (rowmnist)")
    p.add_argument("--config", type=json.loads, default={},
                   help='extra HBLLConfig fields as JSON, e.g. {"inputs": "tree"}')
    p.add_argument("--depth", type=int, default=16, help="residual blocks of the resmlp network")
    p.add_argument("--width", type=int, default=256, help="width of the resmlp_ln network")
    p.add_argument("--oracle-couplers", action="store_true",
                   help="diagnostic: replace every coupler by the exact blocks it spans (O(N) depth)")
    p.add_argument("--jobs", type=int, default=2, help="parallel runs (one thread each)")
    p.add_argument("--out", default=None, help="JSON-lines file to append results to")
    p.add_argument("--summarise", default=None, metavar="FILE", help="only print the tables of a JSON-lines file")
    args = p.parse_args(argv)
    if args.summarise:
        print(summarise([json.loads(line) for line in Path(args.summarise).read_text().splitlines() if line]))
        return
    jobs = [{"suite": args.suite, "objective": o, "blocks": n, "seed": s, "epochs": args.epochs,
             "steps": args.steps, "config": args.config if o == "hbll" else {}, "depth": args.depth,
             "width": args.width, "cell": args.cell, "layers": args.layers,
             "oracle": args.oracle_couplers and o == "hbll"}
            for n in args.blocks for o in args.objectives for s in args.seeds]
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"accuracy_{args.suite}.jsonl")
    rows = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for row in pool.map(run_one, jobs):
            rows.append(row)
            metric = row[_metric(row)]
            print(f"{row['suite']} N={row['blocks']} {row['objective']} seed {row['seed']}: {metric:.4f} "
                  f"({row['train_seconds']:.0f}s)", flush=True)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
    print(summarise(rows))


if __name__ == "__main__":
    main()
