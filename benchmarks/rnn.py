"""HBLL-RNN benchmarks (issue 11): row-by-row MNIST, full BPTT vs truncated BPTT vs HBLL over time chunks.

A GRU or LSTM (hidden 128) reads a 28x28 digit one row of 28 pixels per step and is classified at the
last step. Every run builds the network from its seed, compiles it with ``over="time"`` into N chunks of
steps under the objective being measured (``bp`` = full BPTT, ``tbptt`` = truncated BPTT with the same
chunks, ``hbll``), and trains it with ``AdamW`` through ``m.fit`` (exactly the user loop), single
process, one thread. Each row also records the step's FLOPs against full BPTT's (counted with
``FlopCounterMode`` on one training step of a batch) and the schedule's critical path.

The adding problem (``--task adding``, T = ``--length``) is the long-memory check: the target needs the
value marked in the first half of the sequence. Measured, truncated BPTT learns it anyway: its rule
("add a marked value to the state") is the same at every step, and with weights shared over time the
last chunk, where the second marker falls half the time, teaches it to every chunk. ``--task
adding-early`` puts both markers in the first half, so the last chunk never sees one and only credit
carried across chunks can teach the rule.

``--task charlm`` is the language model: a character-level LSTM (embedding 32, hidden ``--hidden``) reads
windows of ``--length`` characters of the standard-library corpus (``hbll_compile.data.load_char_lm``) and
predicts every next character, so every chunk *emits* its steps' outputs; each row gives held-out
perplexity (64 windows spread over the held-out text) after ``--steps`` steps.

Examples (the commands behind benchmarks/results/issue11_rnn.md):
    python benchmarks/rnn.py --cells gru lstm --blocks 4 --seeds 0 1 2 --epochs 3
    python benchmarks/rnn.py --task adding --blocks 4 --seeds 0 --steps 1500 --batch 128 --out adding.jsonl
    python benchmarks/rnn.py --task charlm --length 128 --blocks 4 8 --seeds 0 --steps 300 --out charlstm.jsonl
    python benchmarks/rnn.py --summarise benchmarks/results/rnn_rowmnist.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import hbll_compile as hc
from hbll_compile.data import load_char_lm, load_mnist8k, make_loaders
from hbll_compile.runtime.trainer import evaluate

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "rnn_rowmnist.jsonl"


class RowRNN(nn.Module):
    """A digit (B, 1, 28, 28) read row by row by ``nn.GRU``/``nn.LSTM``, classified at the last step."""

    def __init__(self, cell: str = "gru", hidden: int = 128, classes: int = 10, layers: int = 1) -> None:
        super().__init__()
        self.rnn = (nn.GRU if cell == "gru" else nn.LSTM)(28, hidden, layers, batch_first=True)
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
            config: dict[str, Any], layers: int = 1) -> dict[str, Any]:
    torch.set_num_threads(1)
    train, test = load_mnist8k()
    torch.manual_seed(seed)
    net = RowRNN(cell, layers=layers)
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
    return {"cell": cell if layers == 1 else f"{cell}x{layers}", "objective": objective, "blocks": n, "seed": seed,
            "epochs": epochs, "batch": batch,
            "lr": lr, "config": config, "accuracy": evaluate(m, test_loader)["accuracy"],
            "epoch_accuracy": history["eval_accuracy"], "train_seconds": seconds,
            "flops_vs_bptt": flops / bp_flops, "critical_path": m.schedule.critical_path(),
            "bptt_critical_path": bp.schedule.critical_path(), "chunk_steps": _chunk_steps(m)}


class AddingRNN(nn.Module):
    """The adding problem's network: a GRU over (value, marker) pairs, a linear readout of the last step."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.rnn = nn.GRU(2, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.rnn(x)[0][:, -1]).squeeze(1)


def adding_batch(batch: int, length: int, generator: torch.Generator,
                 early: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Hochreiter & Schmidhuber's adding problem: values uniform in [0, 1], one marker in the first half
    and one in the second; the target is the sum of the two marked values. Predicting the mean scores
    MSE 1/6. With ``early`` both markers fall in the first half (first and second quarter), so no
    marker ever falls in the last chunk of N >= 2 chunks."""
    values = torch.rand(batch, length, generator=generator)
    half = length // 4 if early else length // 2
    first = torch.randint(0, half, (batch,), generator=generator)
    second = torch.randint(half, 2 * half, (batch,), generator=generator)
    markers = torch.zeros(batch, length)
    rows = torch.arange(batch)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    return torch.stack([values, markers], dim=2), (values * markers).sum(1)


def run_adding(objective: str, n: int, seed: int, steps: int, length: int, batch: int, lr: float,
               config: dict[str, Any], early: bool = False) -> dict[str, Any]:
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = AddingRNN()
    example = adding_batch(2, length, generator, early)[0]
    m = hc.hbll_compile(net, (example,), blocks=n, loss=F.mse_loss, over="time",
                        config=hc.HBLLConfig(objective=objective, seed=seed, **config))  # type: ignore[arg-type]
    optimizer = torch.optim.AdamW(m.parameters(), lr=lr)
    test_x, test_y = adding_batch(1000, length, torch.Generator().manual_seed(10_000 + seed), early)
    curve = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        x, y = adding_batch(batch, length, generator, early)
        optimizer.zero_grad()
        m.training_step(x, target=y)
        optimizer.step()
        if step % max(1, steps // 10) == 0:
            with torch.no_grad():
                curve.append(F.mse_loss(m.eval()(test_x), test_y).item())
            m.train()
    return {"task": "adding-early" if early else "adding", "objective": objective, "blocks": n, "seed": seed,
            "steps": steps, "length": length,
            "batch": batch, "lr": lr, "config": config, "test_mse": curve[-1], "mse_curve": curve,
            "train_seconds": time.perf_counter() - start, "critical_path": m.schedule.critical_path()}


class CharLSTM(nn.Module):
    """A character-level LSTM language model: (batch, time) ids to (batch, time, vocab) logits."""

    def __init__(self, vocab: int, hidden: int = 128, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.rnn = nn.LSTM(dim, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.rnn(self.embed(ids))[0])


def sequence_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def run_charlm(objective: str, n: int, seed: int, steps: int, length: int, batch: int, lr: float, hidden: int,
               config: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(1)
    train, val, _ = load_char_lm(block_size=length)
    stride = len(val) // 64
    held_out = [val[i] for i in range(0, stride * 64, stride)]
    val_x, val_y = torch.stack([p[0] for p in held_out]), torch.stack([p[1] for p in held_out])
    torch.manual_seed(seed)
    net = CharLSTM(train.vocab_size, hidden)
    example = (train[0][0].unsqueeze(0).repeat(2, 1),)
    m = hc.hbll_compile(net, example, blocks=n, loss=sequence_loss, over="time",
                        config=hc.HBLLConfig(objective=objective, seed=seed, **config))  # type: ignore[arg-type]
    bp = hc.hbll_compile(net, example, blocks=n, loss=sequence_loss, over="time", config=hc.HBLLConfig(objective="bp"))
    loader = torch.utils.data.DataLoader(train, batch_size=batch, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    x, y = next(iter(loader))
    flops, bp_flops = step_flops(m, x, y), step_flops(bp, x, y)
    optimizer = torch.optim.AdamW(m.parameters(), lr=lr)
    curve, step, start = [], 0, time.perf_counter()
    while step < steps:
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            m.training_step(x, target=y)
            optimizer.step()
            step += 1
            if step % max(1, steps // 4) == 0:
                with torch.no_grad():
                    curve.append(math.exp(sequence_loss(m.eval()(val_x), val_y).item()))
                m.train()
            if step >= steps:
                break
    return {"task": "charlm", "objective": objective, "blocks": n, "seed": seed, "steps": steps, "length": length,
            "batch": batch, "lr": lr, "hidden": hidden, "config": config, "perplexity": curve[-1],
            "perplexity_curve": curve, "train_seconds": time.perf_counter() - start,
            "flops_vs_bptt": flops / bp_flops, "critical_path": m.schedule.critical_path(),
            "bptt_critical_path": bp.schedule.critical_path()}


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
    parser.add_argument("--task", default="rowmnist", choices=["rowmnist", "adding", "adding-early", "charlm"])
    parser.add_argument("--hidden", type=int, default=128, help="charlm: LSTM hidden size")
    parser.add_argument("--layers", type=int, default=1, help="rowmnist: recurrent layers")
    parser.add_argument("--steps", type=int, default=1500, help="adding: training steps")
    parser.add_argument("--length", type=int, default=100, help="adding, charlm: sequence length T")
    args = parser.parse_args(argv)
    if args.task == "charlm":
        for n in args.blocks:
            for objective in args.objectives:
                for seed in args.seeds:
                    row = run_charlm(objective, n, seed, args.steps, args.length, args.batch, args.lr, args.hidden,
                                     json.loads(args.config))
                    with args.out.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(f"charlm T={args.length} N={n} {objective} seed {seed}: perplexity {row['perplexity']:.3f} "
                          f"curve {[round(v, 3) for v in row['perplexity_curve']]} FLOPs/BPTT "
                          f"{row['flops_vs_bptt']:.2f} ({row['train_seconds']:.0f} s)", flush=True)
        return
    if args.task in ("adding", "adding-early"):
        for n in args.blocks:
            for objective in args.objectives:
                for seed in args.seeds:
                    row = run_adding(objective, n, seed, args.steps, args.length, args.batch, args.lr,
                                     json.loads(args.config), early=args.task == "adding-early")
                    with args.out.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(f"{args.task} T={args.length} N={n} {objective} seed {seed}: test MSE {row['test_mse']:.4f} "
                          f"({row['train_seconds']:.0f} s) curve {[round(v, 4) for v in row['mse_curve']]}", flush=True)
        return
    if args.summarise:
        print(summarise([json.loads(line) for line in args.summarise.read_text().splitlines() if line.strip()]))
        return
    rows = []
    for cell in args.cells:
        for n in args.blocks:
            for objective in args.objectives:
                for seed in args.seeds:
                    row = run_one(cell, objective, n, seed, args.epochs, args.batch, args.lr, json.loads(args.config),
                                  args.layers)
                    rows.append(row)
                    with args.out.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(f"{cell} N={n} {objective} seed {seed}: {100 * row['accuracy']:.2f}% "
                          f"({row['train_seconds']:.0f} s, FLOPs x{row['flops_vs_bptt']:.2f})", flush=True)
    print(summarise(rows))


if __name__ == "__main__":
    main()
