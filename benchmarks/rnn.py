"""HBLL-RNN benchmarks (issue 11): row-by-row MNIST, full BPTT vs truncated BPTT vs HBLL over time chunks.

A GRU or LSTM (hidden 128) reads a 28x28 digit one row of 28 pixels per step and is classified at the
last step. Every run builds the network from its seed, compiles it with ``over="time"`` into N chunks of
steps under the objective being measured (``bp`` = full BPTT, ``tbptt`` = truncated BPTT with the same
chunks, ``hbll``), and trains it with ``AdamW`` through ``m.fit`` (exactly the user loop), single
process, one thread. Each row also records the step's FLOPs against full BPTT's (counted with
``FlopCounterMode`` on one training step of a batch) and the schedule's critical path.

Examples (the commands behind benchmarks/results/issue11_rnn.md):
    python benchmarks/rnn.py --cells gru lstm --blocks 4 --seeds 0 1 2 --epochs 2
    python benchmarks/rnn.py --summarise benchmarks/results/rnn_rowmnist.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import hbll_compile as hc
from hbll_compile.data import load_mnist8k, make_loaders
from hbll_compile.runtime.trainer import evaluate

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "rnn_rowmnist.jsonl"


class RowRNN(nn.Module):
    """A digit (B, 1, 28, 28) read row by row by ``nn.GRU``/``nn.LSTM``, classified at the last step."""

    def __init__(self, cell: str = "gru", hidden: int = 128, classes: int = 10) -> None:
        super().__init__()
        self.rnn = (nn.GRU if cell == "gru" else nn.LSTM)(28, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x.flatten(1, 2))
        return self.fc(out[:, -1])


def step_flops(m: hc.HBLLModel, x: torch.Tensor, y: torch.Tensor) -> int:
    """FLOPs of one training step after the wavefront warm-up; weights and gradients are put back."""
    state = {k: v.clone() for k, v in m.state_dict().items()}
    for _ in range(len(m.blocks)):
        m.training_step(x, target=y)
    with FlopCounterMode(display=False) as counter:
        m.training_step(x, target=y)
    m.load_state_dict(state)
    m.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def run_one(cell: str, objective: str, n: int, seed: int, epochs: int, batch: int, lr: float,
            config: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(1)
    train, test = load_mnist8k()
    torch.manual_seed(seed)
    net = RowRNN(cell)
    m = hc.hbll_compile(net, (train.tensors[0][:2],), blocks=n, loss=F.cross_entropy, over="time",
                        config=hc.HBLLConfig(objective=objective, seed=seed, **config))  # type: ignore[arg-type]
    bp = hc.hbll_compile(net, (train.tensors[0][:2],), blocks=n, loss=F.cross_entropy, over="time",
                         config=hc.HBLLConfig(objective="bp"))
    x, y = train.tensors[0][:batch], train.tensors[1][:batch]
    flops, bp_flops = step_flops(m, x, y), step_flops(bp, x, y)
    train_loader, test_loader = make_loaders(train, test, batch_size=batch, seed=seed)
    start = time.perf_counter()
    history = m.fit(train_loader, epochs, torch.optim.AdamW(m.parameters(), lr=lr), test_loader, progress=False)
    seconds = time.perf_counter() - start
    return {"cell": cell, "objective": objective, "blocks": n, "seed": seed, "epochs": epochs, "batch": batch,
            "lr": lr, "config": config, "accuracy": evaluate(m, test_loader)["accuracy"],
            "epoch_accuracy": history["eval_accuracy"], "train_seconds": seconds,
            "flops_vs_bptt": flops / bp_flops, "critical_path": m.schedule.critical_path(),
            "bptt_critical_path": bp.schedule.critical_path(), "chunk_steps": _chunk_steps(m)}


def _chunk_steps(m: hc.HBLLModel) -> list[int]:
    return [sum("_cell" in name for name in spec.nodes) for spec in m.specs]


def summarise(rows: list[dict[str, Any]]) -> str:
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        key = (row["cell"], row["blocks"], row["objective"], json.dumps(row["config"], sort_keys=True), row["epochs"])
        groups.setdefault(key, []).append(row)
    lines = ["| cell | N | objective | config | epochs | seeds | test accuracy % (mean ± std) | FLOPs/step vs BPTT "
             "| critical path (BPTT over chunks: 2N; over steps: 2T = 56) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (cell, n, objective, config, epochs), group in sorted(groups.items()):
        acc = [100 * r["accuracy"] for r in group]
        spread = statistics.stdev(acc) if len(acc) > 1 else 0.0
        lines.append(f"| {cell} | {n} | {objective} | {config} | {epochs} | {len(group)} | "
                     f"{statistics.mean(acc):.2f} ± {spread:.2f} | {group[0]['flops_vs_bptt']:.2f} | "
                     f"{group[0]['critical_path']} (BPTT {group[0]['bptt_critical_path']}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", nargs="+", default=["gru", "lstm"], choices=["gru", "lstm"])
    parser.add_argument("--blocks", nargs="+", type=int, default=[4])
    parser.add_argument("--objectives", nargs="+", default=["bp", "tbptt", "hbll"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--config", default="{}", help="JSON of HBLLConfig fields for every run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--summarise", type=Path, help="print the table of a results file and exit")
    args = parser.parse_args(argv)
    if args.summarise:
        print(summarise([json.loads(line) for line in args.summarise.read_text().splitlines() if line.strip()]))
        return
    rows = []
    for cell in args.cells:
        for n in args.blocks:
            for objective in args.objectives:
                for seed in args.seeds:
                    row = run_one(cell, objective, n, seed, args.epochs, args.batch, args.lr, json.loads(args.config))
                    rows.append(row)
                    with args.out.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(f"{cell} N={n} {objective} seed {seed}: {100 * row['accuracy']:.2f}% "
                          f"({row['train_seconds']:.0f} s, FLOPs x{row['flops_vs_bptt']:.2f})", flush=True)
    print(summarise(rows))


if __name__ == "__main__":
    main()
