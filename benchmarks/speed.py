"""Speed benchmark: per-step wall time, FLOPs and critical path of BP against HBLL on the same network.

For each configuration it builds a network (``--model``: by default a residual-MLP stack of N blocks,
one residual block per HBLL block; or the ResNet or char-GPT of ``examples/``), and times
``m.training_step`` + ``optimizer.step()`` under ``objective="bp"`` and ``"hbll"``, both run by the
same executor; the HBLL rows run once per ``--executors`` entry (``"loop"``: tasks one after
another; ``"batched"``: identical blocks as one vmap over stacked parameters). FLOPs per step are
counted with ``torch.utils.flop_counter.FlopCounterMode``; peak memory is reported on CUDA devices. On
a GPU it also times BP as one captured CUDA graph (the strong baseline of issue 4).

Examples:
    python benchmarks/speed.py --blocks 8 32 --width 256 --batch 64 --device cpu
    python benchmarks/speed.py --model resnet --blocks 4 8 --batch 64 --device cpu
    python benchmarks/speed.py --model gpt --blocks 4 8 --width 128 --batch 32 --device cpu
    python benchmarks/speed.py --blocks 8 32 128 --width 256 1024 --batch 64 512 --device cuda   # GPU rows
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import hbll_compile as hc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from charlm_gpt import build_model as build_gpt  # noqa: E402
from charlm_gpt import sequence_loss  # noqa: E402
from cifar10_resnet import build_model as build_resnet  # noqa: E402
from mnist_resmlp import ResidualBlock  # noqa: E402  (the same block the accuracy benchmark trains)

MODELS = ("stack", "resnet", "gpt")
"""``stack``: :class:`Stack` of N blocks of ``width``; ``resnet``: ``examples/cifar10_resnet.py`` (BatchNorm,
3x32x32 inputs; ``width`` unused); ``gpt``: ``examples/charlm_gpt.py`` with N layers of ``width``, context 64."""


class Stack(nn.Module):
    """N residual blocks of one width and a linear head: one block per HBLL block."""

    def __init__(self, width: int, depth: int, classes: int = 10) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[ResidualBlock(width) for _ in range(depth)])
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


@dataclass
class Workload:
    """A network, one batch and its loss (on the CPU)."""

    net: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def workload(model: str, n: int, width: int, batch: int) -> Workload:
    """The network ``model`` (see :data:`MODELS`) sized for N blocks, with a random batch."""
    torch.manual_seed(0)
    if model == "stack":
        return Workload(Stack(width, n), torch.randn(batch, width), torch.randint(0, 10, (batch,)), F.cross_entropy)
    if model == "resnet":
        return Workload(build_resnet(), torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,)), F.cross_entropy)
    vocab, context = 96, 64
    tokens = torch.randint(0, vocab, (batch, context + 1))
    return Workload(build_gpt(vocab, layers=n, dim=width, context=context), tokens[:, :-1], tokens[:, 1:],
                    sequence_loss)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(model: str, objective: str, n: int, width: int, batch: int, device: torch.device, steps: int,
            config: dict) -> dict[str, float]:
    work = workload(model, n, width, batch)
    # compiled on the CPU, then moved: HBLLModel.to() moves the user's model too
    m = hc.hbll_compile(work.net, (work.x[:2],), blocks=n, loss=work.loss,
                        config=hc.HBLLConfig(objective=objective, **config)).to(device)
    x, y = work.x.to(device), work.y.to(device)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        m.training_step(x, target=y)
        opt.step()

    for _ in range(n + 2):  # fill the wavefront pipeline and warm up allocators
        step()
    with FlopCounterMode(display=False) as counter:
        m.training_step(x, target=y)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    row = {"model": model, "objective": objective, "executor": m.config.executor, "blocks": n, "width": width,
           "batch": batch,
           "device": _device_name(device), "ms_per_step": 1e3 * statistics.median(times),
           "gflops_per_step": counter.get_total_flops() / 1e9, "critical_path": m.schedule.critical_path()}
    if device.type == "cuda":
        row["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def measure_bp_cuda_graph(model: str, n: int, width: int, batch: int, device: torch.device,
                          steps: int) -> dict[str, float]:
    """The whole BP step (forward, backward, capturable AdamW) captured as one CUDA graph."""
    work = workload(model, n, width, batch)
    net, x, y, loss = work.net.to(device), work.x.to(device), work.y.to(device), work.loss
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, capturable=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            opt.zero_grad(set_to_none=False)
            loss(net(x), y).backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        loss(net(x), y).backward()
        opt.step()
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"model": model, "objective": "bp-cudagraph", "blocks": n, "width": width, "batch": batch,
            "device": _device_name(device), "ms_per_step": 1e3 * statistics.median(times), "critical_path": 2 * n}


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=MODELS, default="stack")
    p.add_argument("--blocks", type=int, nargs="+", default=[8, 32])
    p.add_argument("--width", type=int, nargs="+", default=[256])
    p.add_argument("--batch", type=int, nargs="+", default=[64])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--config", type=json.loads, default={}, help="extra HBLLConfig fields for the HBLL rows")
    p.add_argument("--executors", nargs="+", default=["loop", "batched"], choices=["loop", "batched"],
                   help="HBLLConfig.executor of the HBLL rows, one row each")
    p.add_argument("--out", default=None, help="JSON-lines file to append rows to")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for n in args.blocks:
        for width in args.width:
            for batch in args.batch:
                bp = measure(args.model, "bp", n, width, batch, device, args.steps, {})
                hbll = [measure(args.model, "hbll", n, width, batch, device, args.steps,
                                {**args.config, "executor": executor}) for executor in args.executors]
                for row in hbll:
                    row["flops_ratio_to_bp"] = row["gflops_per_step"] / bp["gflops_per_step"]
                    row["speedup_vs_bp"] = bp["ms_per_step"] / row["ms_per_step"]
                rows += [bp, *hbll]
                if device.type == "cuda":
                    graphed = measure_bp_cuda_graph(args.model, n, width, batch, device, args.steps)
                    for row in hbll:
                        row["speedup_vs_bp_cudagraph"] = graphed["ms_per_step"] / row["ms_per_step"]
                    rows.append(graphed)
    if args.out:
        with Path(args.out).open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    keys = ["device", "model", "objective", "executor", "blocks", "width", "batch", "ms_per_step", "gflops_per_step",
            "flops_ratio_to_bp", "speedup_vs_bp", "speedup_vs_bp_cudagraph", "critical_path", "peak_mem_mb"]
    print("| " + " | ".join(keys) + " |")
    print("|" + " --- |" * len(keys))
    for row in rows:
        cells = [f"{row[k]:.3g}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in keys]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
