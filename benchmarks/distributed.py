"""Distributed benchmark (issue 10): HBLL on ranks against BP and torch.distributed.pipelining, plus a
scaling model for R = 2..64 ranks.

Measured, on one machine, for a deep narrow residual MLP (``--blocks`` residual blocks of ``--width``,
batch ``--batch``), median wall time per training step (forward, backward/local updates, AdamW step):

- ``bp``: plain PyTorch backprop in one process with 2 threads;
- ``hbll``: ``m.training_step`` in one process with 2 threads;
- ``gpipe``, ``1f1b``: ``torch.distributed.pipelining`` ``ScheduleGPipe`` / ``Schedule1F1B``, 2 ranks x 1
  thread, ``--microbatches`` microbatches, the blocks split evenly;
- ``hbll-dist``: ``hc.distribute`` on 2 ranks x 1 thread (``sync_every=1``).

Scaling model (printed after the measurements): per-task times measured in one process with 1 thread
(each HBLL update task of an N-block model through ``m.register_task_hook``; one residual block's
forward and backward at every microbatch size), combined with a link model (latency alpha, bandwidth
beta per message; every message is charged in full, none is assumed to overlap compute):

- HBLL on R ranks: step = max over ranks of (its tasks' time + its inbound messages: boundaries
  ``B x d`` floats, replica tensors from :func:`hbll_compile.runtime.distributed.plan`); bubble = idle
  share of R x step. The wavefront's warm-up (N-1 steps once per run) is not per step and is left out.
- GPipe and 1F1B (same step time; 1F1B only saves memory): ``(M + R - 1) x (F + B)`` with per-microbatch
  stage times F, B (k = N/R blocks plus one activation/gradient message); bubble ``(R-1)/(M+R-1)``.
- Zero bubble (ZB-H1, Qi et al. 2024): ``M (F + B + W) + (R - 1)(F + B - 2W)`` with the backward split
  into input-gradient B = W = half the measured backward.

``M = min(batch, 4R)`` microbatches in the scaling table. The R = 2 row of the model is printed
beside the 2-rank measurement (with the measured ``M``) as the model's check.

Example:
    python benchmarks/distributed.py --blocks 32 --width 128 --batch 64 --steps 20
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import hbll_compile as hc
from hbll_compile.runtime.distributed import place, plan
from hbll_compile.runtime.schedule import Task, TaskKind

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import Stack  # noqa: E402  (the residual-MLP stack of the speed benchmark)


@dataclass(frozen=True)
class Link:
    """Per-message cost ``alpha + bytes / beta``."""

    name: str
    alpha_s: float
    beta_bytes_per_s: float

    def cost(self, nbytes: float, messages: int = 1) -> float:
        return messages * self.alpha_s + nbytes / self.beta_bytes_per_s


LINKS = (
    Link("loopback (gloo, this machine; assumed)", 50e-6, 2e9),
    Link("PCIe 4.0 x16", 10e-6, 24e9),
    Link("NVLink 4 (H100, per direction)", 3e-6, 450e9),
    Link("1 Gb/s Ethernet", 50e-6, 0.125e9),
)
"""Stated link model: latency and bandwidth per message; the loopback row is only for the R = 2 check."""


def _build(args: argparse.Namespace) -> Stack:
    torch.manual_seed(0)
    return Stack(args.width, args.blocks)


def _batch(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(args.batch, args.width, generator=g), torch.randint(0, 10, (args.batch,), generator=g)


def _time_steps(step: Callable[[], object], warmup: int, steps: int, sync: Callable[[], None] = lambda: None) -> float:
    """Median seconds per step of ``step`` after ``warmup`` steps."""
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def single_process(args: argparse.Namespace, objective: str, threads: int = 2) -> float:
    torch.set_num_threads(threads)
    net, (x, y) = _build(args), _batch(args)
    if objective == "bp":
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)

        def step() -> None:
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    else:
        m = hc.hbll_compile(net, (x[:2],), blocks=args.blocks, loss=F.cross_entropy)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)

        def step() -> None:
            opt.zero_grad()
            m.training_step(x, target=y)
            opt.step()
    return _time_steps(step, args.blocks + args.warmup, args.steps)


def _rank_main(rank: int, world: int, port: int, mode: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    net, (x, y) = _build(args), _batch(args)
    if mode == "hbll-dist":
        dm = hc.distribute(hc.hbll_compile(net, (x[:2],), blocks=args.blocks, loss=F.cross_entropy))
        opt = torch.optim.AdamW(dm.parameters(), lr=1e-3)

        def step() -> None:
            opt.zero_grad()
            dm.training_step(x, target=y)
            opt.step()
        warmup = args.blocks + args.warmup
    else:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        dist.init_process_group("gloo")
        half = args.blocks // 2
        layers = list(net.blocks)
        stage_module = nn.Sequential(*layers[:half]) if rank == 0 else nn.Sequential(*layers[half:], net.head)
        stage = PipelineStage(stage_module, rank, world, torch.device("cpu"))
        schedule_cls = ScheduleGPipe if mode == "gpipe" else Schedule1F1B
        schedule = schedule_cls(stage, n_microbatches=args.microbatches, loss_fn=F.cross_entropy)
        opt = torch.optim.AdamW(stage_module.parameters(), lr=1e-3)

        def step() -> None:
            opt.zero_grad()
            if rank == 0:
                schedule.step(x)
            else:
                schedule.step(target=y, losses=[])
            opt.step()
        warmup = args.warmup
    seconds = _time_steps(step, warmup, args.steps, sync=dist.barrier)
    Path(out, f"{mode}.{rank}").write_text(repr(seconds))
    dist.barrier()
    dist.destroy_process_group()


def two_ranks(args: argparse.Namespace, mode: str) -> float:
    """Median step time of the slower rank."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank_main, args=(2, port, mode, args, out), nprocs=2, start_method="spawn")
        return max(float(Path(out, f"{mode}.{r}").read_text()) for r in range(2))


# -- the scaling model ---------------------------------------------------------------------------------
def task_times(width: int, blocks: int, batch: int, steps: int = 3) -> tuple[hc.HBLLModel, dict[Task, float]]:
    """Median seconds of each update task of an N-block HBLL step (1 thread), once every block runs."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = torch.randn(batch, width), torch.randint(0, 10, (batch,))
    m = hc.hbll_compile(Stack(width, blocks), (x[:2],), blocks=blocks, loss=F.cross_entropy)
    started: dict[Task, float] = {}
    seen: dict[Task, list[float]] = {}

    def hook(task: Task, done: bool) -> None:
        if done:
            seen.setdefault(task, []).append(time.perf_counter() - started[task])
        else:
            started[task] = time.perf_counter()

    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    for k in range(blocks + steps):
        handle = m.register_task_hook(hook) if k >= blocks else None
        opt.zero_grad()
        m.training_step(x, target=y)
        opt.step()
        if handle is not None:
            handle.remove()
    return m, {task: statistics.median(ts) for task, ts in seen.items()}


def block_times(width: int, batch: int, repeats: int = 20) -> tuple[float, float]:
    """Median forward and backward seconds of one residual block on ``batch`` samples (1 thread)."""
    torch.set_num_threads(1)
    block = Stack(width, 1).blocks[0]
    x = torch.randn(batch, width, requires_grad=True)
    fwd, bwd = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        out = block(x)
        mid = time.perf_counter()
        out.sum().backward()
        fwd.append(mid - start)
        bwd.append(time.perf_counter() - mid)
    return statistics.median(fwd), statistics.median(bwd)


@dataclass(frozen=True)
class Prediction:
    step_s: float
    bubble: float


def predict_hbll(m: hc.HBLLModel, times: dict[Task, float], ranks: int, batch: int, link: Link) -> Prediction:
    placement = place(m, ranks)
    owner = placement.owner(m)
    compute = [0.0] * ranks
    for task, seconds in times.items():
        if task.kind in (TaskKind.BLOCK_UPDATE, TaskKind.COUPLER_UPDATE):
            compute[owner(task.unit)] += seconds
    width_bytes = m.boundaries[1].shape[-1] * 4 * batch
    total = []
    for r, rank_plan in enumerate(plan(m, placement)):
        boundaries = sum(len(js) for js in rank_plan.boundaries.values())
        comm = link.cost(boundaries * width_bytes, boundaries) + link.cost(rank_plan.replica_bytes,
                                                                           len(rank_plan.replicas))
        total.append(compute[r] + comm)
    step = max(total)
    return Prediction(step, 1 - sum(compute) / (ranks * step))


def predict_pipeline(
    blocks: int, ranks: int, microbatches: int, fb: tuple[float, float], width: int, micro: int, link: Link,
    zero_bubble: bool = False,
) -> Prediction:
    k = blocks / ranks
    message = link.cost(micro * width * 4)
    f, b = k * fb[0] + message, k * fb[1] + message
    if zero_bubble:  # ZB-H1: backward split into input-gradient and weight-gradient halves
        step = microbatches * (f + b) + (ranks - 1) * max(0.0, f + b / 2 - b)
    else:
        step = (microbatches + ranks - 1) * (f + b)
    return Prediction(step, 1 - microbatches * (k * sum(fb)) / step)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--scaling-blocks", type=int, default=64, help="N of the scaling model (R up to N)")
    parser.add_argument("--skip-measure", action="store_true", help="only the scaling model")
    args = parser.parse_args(argv)

    print(f"# residual MLP: {args.blocks} blocks, d={args.width}, batch {args.batch}; "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}")
    measured: dict[str, float] = {}
    if not args.skip_measure:
        measured["bp"] = single_process(args, "bp")
        measured["hbll"] = single_process(args, "hbll")
        measured["bp, 1 thread"] = single_process(args, "bp", threads=1)  # shows what oversubscription costs
        measured["hbll, 1 thread"] = single_process(args, "hbll", threads=1)
        for mode in ("gpipe", "1f1b", "hbll-dist"):
            measured[mode] = two_ranks(args, mode)
        print("\n| run | ms/step | vs BP (2 threads) |\n| --- | ---: | ---: |")
        for name, seconds in measured.items():
            print(f"| {name} | {1e3 * seconds:.1f} | {measured['bp'] / seconds:.2f}x |")

    m_check, t_check = task_times(args.width, args.blocks, args.batch)
    loop = LINKS[0]
    fb_check = block_times(args.width, args.batch // args.microbatches)
    check_hbll = predict_hbll(m_check, t_check, 2, args.batch, loop)
    check_pipe = predict_pipeline(args.blocks, 2, args.microbatches, fb_check, args.width,
                                  args.batch // args.microbatches, loop)
    print(f"\nmodel check at R=2 ({loop.name}): HBLL {1e3 * check_hbll.step_s:.1f} ms"
          + (f" (measured {1e3 * measured['hbll-dist']:.1f})" if measured else "")
          + f", GPipe/1F1B {1e3 * check_pipe.step_s:.1f} ms"
          + (f" (measured {1e3 * measured['gpipe']:.1f} / {1e3 * measured['1f1b']:.1f})" if measured else ""))

    n = args.scaling_blocks
    m, times = task_times(args.width, n, args.batch)
    ranks = [r for r in (2, 4, 8, 16, 32, 64) if r <= n]
    micro_of = {r: args.batch // min(args.batch, 4 * r) for r in ranks}
    fb = {micro: block_times(args.width, micro) for micro in set(micro_of.values())}
    for link in LINKS[1:]:
        print(f"\n### {link.name}: N={n} blocks, batch {args.batch}, M=min(batch, 4R) microbatches "
              "(step ms, bubble %)\n")
        print("| R | HBLL | GPipe / 1F1B | ZB-H1 | HBLL speed-up vs 1F1B |\n| ---: | ---: | ---: | ---: | ---: |")
        for r in ranks:
            mbs, micro = min(args.batch, 4 * r), micro_of[r]
            h = predict_hbll(m, times, r, args.batch, link)
            p = predict_pipeline(n, r, mbs, fb[micro], args.width, micro, link)
            z = predict_pipeline(n, r, mbs, fb[micro], args.width, micro, link, zero_bubble=True)
            print(f"| {r} | {1e3 * h.step_s:.2f} ({100 * h.bubble:.0f}%) | {1e3 * p.step_s:.2f} ({100 * p.bubble:.0f}%)"
                  f" | {1e3 * z.step_s:.2f} ({100 * z.bubble:.0f}%) | {p.step_s / h.step_s:.2f}x |")


if __name__ == "__main__":
    main()
