"""Issue 12's benchmark table: BP, DGL and HBLL on four families of networks, same data and loop, several seeds.

Families (network, data, the N of the table):
- ``resmlp``: ``examples/mnist_resmlp.py`` ``ResMLP(256, 16)`` on flattened MNIST-8k, N = 4, 8, 16;
- ``resmlp_ln``: ``models.ResMLPLN(256, 16)`` (LayerNorm before the head), N = 16;
- ``resnet``: ``models.mnist_resnet()`` (BatchNorm, 6 basic blocks, two downsamplings), N = 4, 8;
- ``mixer``: ``models.MLPMixer()`` (7x7 patches, 8 Mixer layers, width 64), N = 8;
- ``chargpt``: ``examples/charlm_gpt.py`` ``CharGPT`` (4 layers, width 128) on standard-library source, N = 4, 8.

A cell is (family, N, objective, seed). MNIST cells train with ``m.fit`` (AdamW 1e-3, batch 128) for
``--epochs`` and record held-out accuracy after every epoch (``fit`` recomputes BatchNorm statistics from
the epoch's last 16 training batches first, for every objective: the ResNet's rows); char-GPT cells
train ``--steps`` steps (AdamW 1e-3, batch 32) and record held-out perplexity every ``--eval-every`` steps.
Every row also holds:
- ``flops_ratio``: FLOPs of one compiled training step over one eager BP step (``flops.flops_ratio``: a
  fresh copy of the seed's network, one training batch, counted once the wavefront pipeline is full);
- ``critical_path``: ``m.schedule.critical_path()``;
- for DGL and HBLL, ``gradient``: ``m.gradient_report(x, target=y)`` at the end of training on the first
  held-out batch (mean and whole-update cosine, per-block cosines and norm ratios, per-coupler errors).

Rules:
- BP's training is the same computation at every N (the chain of blocks, forward then backward), so a BP
  cell trains once per (family, seed) at the family's first N and writes one row per N, each with that
  N's critical path and FLOPs ratio; ``trained_blocks`` records the N it trained at.
- ``--config`` (HBLLConfig fields, as JSON text or a JSON file) applies to HBLL cells only.
- The last-epochs spread of a cell is max - min of its held-out metric over the last three evaluations,
  averaged over seeds.

Examples:
    python benchmarks/table.py --families resmlp resnet --objectives bp dgl --seeds 0 1 2 --epochs 5 --jobs 1 \\
        --out benchmarks/results/table_bp_dgl.jsonl
    python benchmarks/table.py --families chargpt --objectives hbll --config cfg.json --jobs 2
    python benchmarks/table.py --objectives bp dgl --resume --out benchmarks/results/table_bp_dgl.jsonl  # finish
    python benchmarks/table.py --summarise benchmarks/results/table_*.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from flops import flops_ratio  # noqa: E402
from models import MLPMixer, ResMLPLN, mnist_resnet  # noqa: E402

__all__ = ["FAMILIES", "Family", "jobs", "main", "run_job", "summarise"]

SPREAD_LAST = 3  # evaluations at the end of training that the spread column looks at


@dataclass(frozen=True)
class Family:
    """A network of the table: how to build it (after ``torch.manual_seed(seed)``), its data, its N."""

    build: Callable[[], nn.Module]
    data: str  # "flat" (784-vectors), "image" (1x28x28) or "chars"
    blocks: tuple[int, ...]


def _resmlp() -> nn.Module:
    from mnist_resmlp import build_model

    return build_model(width=256, depth=16)


def _chargpt_args(job: dict[str, Any]) -> argparse.Namespace:
    from charlm_gpt import parser

    return parser().parse_args(["--steps", str(job["steps"]), "--blocks", str(job["blocks"][0]), "--seed",
                                str(job["seed"]), "--eval-every", str(job["eval_every"]),
                                "--config", json.dumps(job["config"])])


FAMILIES: dict[str, Family] = {
    "resmlp": Family(_resmlp, "flat", (4, 8, 16)),
    "resmlp_ln": Family(lambda: ResMLPLN(width=256, depth=16), "flat", (16,)),
    "resnet": Family(mnist_resnet, "image", (4, 8)),
    "mixer": Family(MLPMixer, "image", (8,)),
    "chargpt": Family(lambda: None, "chars", (4, 8)),  # built by charlm_gpt.train (its vocabulary is the data's)
}


def _cosines(m: Any, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any] | None:
    """End-of-training gradient fidelity on a held-out batch (DGL and HBLL; BP's gradient is the reference)."""
    if m.config.objective == "bp":
        return None
    return {**m.gradient_report(x, target=y).summary(), "batch": len(y)}


Batch = tuple[torch.Tensor, torch.Tensor]
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _mnist_cell(job: dict[str, Any]) -> tuple[dict[str, Any], Any, Callable[[], nn.Module], Loss, Batch, Batch]:
    """Train one MNIST cell; returns its row, the model, the network factory, the loss, a training batch
    and a held-out batch."""
    import hbll_compile as hc
    from hbll_compile.data import load_mnist8k, make_loaders

    family = FAMILIES[job["family"]]
    train, test = load_mnist8k(flatten=family.data == "flat")
    if job["limit"]:
        train = torch.utils.data.TensorDataset(*(t[: job["limit"]] for t in train.tensors))
    torch.manual_seed(job["seed"])
    m = hc.hbll_compile(family.build(), (train.tensors[0][:2],), blocks=job["blocks"][0], loss=F.cross_entropy,
                        config=hc.HBLLConfig(objective=job["objective"], seed=job["seed"], **job["config"]))
    train_loader, test_loader = make_loaders(train, test, batch_size=128, seed=job["seed"])
    start = time.perf_counter()
    history = m.fit(train_loader, job["epochs"], torch.optim.AdamW(m.parameters(), lr=1e-3), test_loader,
                    progress=False)
    row = {"train_seconds": time.perf_counter() - start, "accuracy": history["eval_accuracy"][-1],
           "epoch_accuracy": history["eval_accuracy"]}
    x, y = train.tensors
    return row, m, family.build, F.cross_entropy, (x[:128], y[:128]), (test.tensors[0][:256], test.tensors[1][:256])


def _chargpt_cell(job: dict[str, Any]) -> tuple[dict[str, Any], Any, Callable[[], nn.Module], Loss, Batch, Batch]:
    """Train one char-GPT cell through ``charlm_gpt.train``; the same return values as ``_mnist_cell``."""
    from charlm_gpt import build_model, parser, sequence_loss, train

    from hbll_compile.data import load_char_lm

    args = parser().parse_args(["--steps", str(job["steps"]), "--blocks", str(job["blocks"][0]), "--seed",
                                str(job["seed"]), "--eval-every", str(job["eval_every"]),
                                "--config", json.dumps(job["config"])])
    curve: list[tuple[int, float]] = []
    start = time.perf_counter()
    ppl, m = train(job["objective"], args, curve)
    row = {"train_seconds": time.perf_counter() - start, "perplexity": ppl, "eval_perplexity": curve}
    train_set, val_set, _ = load_char_lm(block_size=args.context)
    stride = len(val_set) // args.batch  # spread the held-out windows over the whole held-out text

    def stack(data: Any, indices: range) -> Batch:
        pairs = [data[i] for i in indices]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def net() -> nn.Module:
        return build_model(train_set.vocab_size, args.layers, args.dim, args.context)

    return (row, m, net, sequence_loss, stack(train_set, range(args.batch)),
            stack(val_set, range(0, stride * args.batch, stride)))


def _commit() -> str:
    """The checked-out commit (with ``+dirty`` for uncommitted changes): which library code made a row."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--", "hbll_compile")
    return git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")


def run_job(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Train one cell (one thread) and return its rows: one, or one per N for BP (see the module rules)."""
    import hbll_compile as hc

    torch.set_num_threads(1)
    started = time.perf_counter()
    cell = _chargpt_cell if job["family"] == "chargpt" else _mnist_cell
    row, m, build, loss, train_batch, held_out = cell(job)
    row["gradient"] = _cosines(m, *held_out)
    rows = []
    for n in job["blocks"]:
        config = {"objective": job["objective"], "seed": job["seed"], **job["config"]}
        if n == job["blocks"][0]:
            path = m.schedule.critical_path()
        else:
            path = hc.hbll_compile(build(), (train_batch[0][:2],), blocks=n, loss=loss,
                                   config=hc.HBLLConfig(**config)).schedule.critical_path()
        torch.manual_seed(job["seed"])
        ratio = flops_ratio(build(), *train_batch, n, config, loss)
        rows.append({**{k: v for k, v in job.items() if k != "blocks"}, "blocks": n,
                     "trained_blocks": job["blocks"][0], **row, "critical_path": path, "flops_ratio": ratio,
                     "seconds": time.perf_counter() - started, "hbll_config": dataclasses.asdict(m.config),
                     "commit": _commit()})
    return rows


def jobs(families: list[str], objectives: list[str], seeds: list[int], blocks: list[int] | None, epochs: int,
         steps: int, eval_every: int, config: dict[str, Any], limit: int | None) -> list[dict[str, Any]]:
    """The cells to run: one job per (family, N, objective, seed), BP one per (family, seed) over its Ns."""
    out = []
    for family in families:
        ns = [n for n in FAMILIES[family].blocks if blocks is None or n in blocks]
        for objective in objectives:
            groups = [ns] if objective == "bp" else [[n] for n in ns]
            for group in groups:
                for seed in seeds:
                    out.append({"family": family, "objective": objective, "blocks": group, "seed": seed,
                                "epochs": epochs, "steps": steps, "eval_every": eval_every, "limit": limit,
                                "config": config if objective == "hbll" else {}})
    return [j for j in out if j["blocks"]]


# -- the table -----------------------------------------------------------------------------------
def _metric(row: dict[str, Any]) -> tuple[float, list[float]]:
    """The final held-out metric and its evaluations during training: accuracy in %, or perplexity."""
    if row["family"] == "chargpt":
        return row["perplexity"], [p for _, p in row["eval_perplexity"]]
    return 100 * row["accuracy"], [100 * a for a in row["epoch_accuracy"]]


def _mean_std(values: list[float], digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _label(row: dict[str, Any]) -> str:
    return row["objective"] + (f" `{json.dumps(row['config'])}`" if row["config"] else "")


def _training(row: dict[str, Any]) -> str:
    """How long a cell trained: rows of different lengths are different cells."""
    if row["family"] == "chargpt":
        return f"{row['steps']} steps"
    return f"{row['epochs']} ep" + (f" on {row['limit']}" if row["limit"] else "")


Cell = tuple[str, int, str, str]  # family, N, objective label, training length


def _groups(rows: list[dict[str, Any]]) -> list[tuple[Cell, list[dict[str, Any]]]]:
    """Rows grouped by cell, in table order; the last row of a seed wins."""
    order = {name: i for i, name in enumerate(FAMILIES)}
    objectives = {"bp": 0, "dgl": 1, "hbll": 2}
    groups: dict[Cell, dict[int, dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["family"], r["blocks"], _label(r), _training(r)), {})[r["seed"]] = r
    keys = sorted(groups, key=lambda k: (order.get(k[0], len(order)), k[0], k[1], k[3],
                                         objectives.get(k[2].split()[0], 3), k[2]))
    return [(k, [groups[k][seed] for seed in sorted(groups[k])]) for k in keys]


def summarise(rows: list[dict[str, Any]]) -> str:
    """Markdown: the table (one row per cell, mean ± std over seeds), then per-block cosines and the
    held-out metric after every evaluation (mean over seeds)."""
    groups = _groups(rows)
    means = {k: statistics.mean(_metric(r)[0] for r in rs) for k, rs in groups}

    def gap(cell: Cell, reference: str) -> str:
        other = (cell[0], cell[1], reference, cell[3])
        return "" if cell[2].split()[0] == reference or other not in means else f"{means[cell] - means[other]:+.2f}"

    lines = ["| family | N | objective | training | seeds | held-out accuracy % (char-GPT: perplexity) | "
             f"− BP | − DGL | spread, last {SPREAD_LAST} evals | FLOPs / BP | critical path | mean block cosine | "
             "whole-update cosine | train s/run |", "|" + " --- |" * 14]
    for cell, rs in groups:
        family, n, label, training = cell
        finals = [_metric(r)[0] for r in rs]
        spreads = [max(c[-SPREAD_LAST:]) - min(c[-SPREAD_LAST:])
                   for c in (_metric(r)[1] for r in rs) if len(c) >= SPREAD_LAST]
        reports = [r["gradient"] for r in rs if r.get("gradient")]
        cosine = _mean_std([g["mean_cosine"] for g in reports], 3) if reports else "–"
        whole = _mean_std([g["global_cosine"] for g in reports], 3) if reports else "–"
        lines.append(f"| {family} | {n} | {label} | {training} | {len(rs)} | {_mean_std(finals)} | {gap(cell, 'bp')} | "
                     f"{gap(cell, 'dgl') if label.split()[0] == 'hbll' else ''} | "
                     f"{f'{statistics.mean(spreads):.2f}' if spreads else '–'} | "
                     f"{statistics.mean(r['flops_ratio'] for r in rs):.2f} | "
                     f"{rs[0]['critical_path']} | {cosine} | {whole} | "
                     f"{statistics.mean(r['train_seconds'] for r in rs):.0f} |")
    lines += ["", "Per-block gradient cosine against BP at the end of training (held-out batch, mean over seeds):", "",
              "| family | N | objective | training | cosine, block 1 → N |", "| --- | --- | --- | --- | --- |"]
    for (family, n, label, training), rs in groups:
        reports = [r["gradient"]["block_cosine"] for r in rs if r.get("gradient")]
        if reports:
            means = [statistics.mean(c[i] for c in reports if c[i] is not None)
                     if any(c[i] is not None for c in reports) else None for i in range(n)]
            lines.append(f"| {family} | {n} | {label} | {training} | "
                         + " ".join("–" if c is None else f"{c:.2f}" for c in means) + " |")
    lines += ["", "Held-out metric after every evaluation (MNIST: every epoch; char-GPT: every `eval_every` "
              "steps), mean over seeds:", "", "| family | N | objective | training | curve |",
              "| --- | --- | --- | --- | --- |"]
    for (family, n, label, training), rs in groups:
        curves = [_metric(r)[1] for r in rs]
        length = min(len(c) for c in curves)
        lines.append(f"| {family} | {n} | {label} | {training} | "
                     + " → ".join(f"{statistics.mean(c[i] for c in curves):.2f}" for i in range(length)) + " |")
    return "\n".join(lines)


def _done_key(cell: dict[str, Any], n: int) -> str:
    """What makes a row (or a job at one of its N) the same cell of the same table."""
    return json.dumps([cell["family"], n, cell["objective"], cell["seed"], cell["config"], _training(cell)])


def _config(text: str) -> dict[str, Any]:
    """HBLLConfig fields: JSON text, or the path of a JSON file."""
    path = Path(text)
    return json.loads(path.read_text() if path.is_file() else text)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    p.add_argument("--objectives", nargs="+", choices=("bp", "dgl", "hbll"), default=["bp", "dgl", "hbll"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--blocks", type=int, nargs="+", default=None, help="only these N (default: every N of a family)")
    p.add_argument("--epochs", type=int, default=5, help="MNIST families")
    p.add_argument("--steps", type=int, default=300, help="char-GPT training steps")
    p.add_argument("--eval-every", type=int, default=75, help="char-GPT: held-out perplexity every k steps")
    p.add_argument("--config", type=_config, default={}, help="HBLLConfig fields for HBLL cells: JSON or a JSON file")
    p.add_argument("--limit", type=int, default=None, help="MNIST: train on the first K digits only (smoke runs)")
    p.add_argument("--jobs", type=int, default=1, help="parallel cells (one process and one thread each)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "table.jsonl"),
                   help="JSON-lines file the rows are appended to")
    p.add_argument("--resume", action="store_true",
                   help="skip the cells whose rows --out already holds (to finish an interrupted table)")
    p.add_argument("--summarise", nargs="+", default=None, metavar="FILE",
                   help="only render the table of these JSON-lines files")
    args = p.parse_args(argv)
    if args.summarise:
        print(summarise([json.loads(line) for f in args.summarise for line in Path(f).read_text().splitlines()
                         if line]))
        return
    todo = jobs(args.families, args.objectives, args.seeds, args.blocks, args.epochs, args.steps, args.eval_every,
                args.config, args.limit)
    if args.resume and Path(args.out).is_file():
        written = [json.loads(line) for line in Path(args.out).read_text().splitlines() if line]
        done = {_done_key(row, row["blocks"]) for row in written}
        todo = [j for j in todo if not all(_done_key(j, n) in done for n in j["blocks"])]
    rows = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for cell in pool.map(run_job, todo):
            for row in cell:
                print(f"{row['family']} N={row['blocks']} {row['objective']} seed {row['seed']}: "
                      f"{_metric(row)[0]:.2f} (train {row['train_seconds']:.0f} s, cell {row['seconds']:.0f} s)",
                      flush=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
            rows += cell
    print(summarise(rows))


if __name__ == "__main__":
    main()
