"""FLOPs of one HBLL training step over one BP step, on the residual MLPs of BENCHMARKS.md.

Both are counted with ``torch.utils.flop_counter.FlopCounterMode``: BP as eager forward, loss and
``backward()`` on the user's network; HBLL as one ``m.training_step`` after the wavefront pipeline is
full (every block, coupler and path works in the measured step).

Example:
    python benchmarks/flops.py --blocks 16
    python benchmarks/flops.py --blocks 16 --config '{"coupler_cost": 0.25}'
    python benchmarks/flops.py --blocks 64 --config '{"coupler_budget": "block"}'
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import hbll_compile as hc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from mnist_resmlp import ResMLP  # noqa: E402
from models import MLPMixer  # noqa: E402
from speed import Stack  # noqa: E402

NETWORKS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mnist_resmlp.ResMLP(256, 16)": (lambda: ResMLP(256, 16), (784,)),
    "mnist_resmlp.ResMLP(256, 24)": (lambda: ResMLP(256, 24), (784,)),
    "mnist_resmlp.ResMLP(512, 32)": (lambda: ResMLP(512, 32), (784,)),
    "mnist_resmlp.ResMLP(256, 64)": (lambda: ResMLP(256, 64), (784,)),
    "speed.Stack(256, 16)": (lambda: Stack(256, 16), (256,)),
    "models.MLPMixer() (the table's)": (MLPMixer, (1, 28, 28)),
}
"""Name -> (factory, per-sample input shape); 10 classes each."""


def flops_ratio(net: nn.Module, x: torch.Tensor, y: torch.Tensor, blocks: int, config: dict,
                loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy) -> float:
    """FLOPs of one compiled training step (``config`` names the objective, HBLL by default) over one eager
    BP step of ``net`` on the batch ``(x, y)``. The compiled step is counted after N + 1 steps, when the
    wavefront pipeline is full; the steps change gradients, not weights (no optimizer step)."""
    with FlopCounterMode(display=False) as counter:
        loss(net(x), y).backward()
    bp = counter.get_total_flops()
    m = hc.hbll_compile(net, (x[:2],), blocks=blocks, loss=loss, config=hc.HBLLConfig(**config))
    for _ in range(blocks + 1):
        m.training_step(x, target=y)
    with FlopCounterMode(display=False) as counter:
        m.training_step(x, target=y)
    return counter.get_total_flops() / bp


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=16)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--config", type=json.loads, default={}, help="HBLLConfig fields as JSON")
    args = p.parse_args(argv)
    print("| network | N | HBLL / BP |\n| --- | --- | --- |")
    for name, (build, shape) in NETWORKS.items():
        torch.manual_seed(0)
        x, y = torch.randn(args.batch, *shape), torch.randint(0, 10, (args.batch,))
        try:
            ratio = f"{flops_ratio(build(), x, y, args.blocks, args.config):.2f}"
        except hc.CutError as err:  # fewer pieces than blocks asked for
            ratio = f"– (at most {err.max_blocks} blocks)"
        print(f"| {name} | {args.blocks} | {ratio} |")


if __name__ == "__main__":
    main()
