"""Fit a coupler offline to one real span of a trained network: how well can it stand in, by width and layout?

The network is the MNIST ResNet of the table (``models.mnist_resnet``), trained with BP for ``--epochs``
epochs and then frozen (BatchNorm in train mode, as in HBLL's paths). The span is its units ``--span A B``
(0 = the stem, 1-6 = the basic blocks), by default (4, 6): two basic blocks, the second one downsampling
(32x14x14 -> 64x7x7). For every layout and width a fresh coupler (gain 4, as in HBLL) is fitted to the span's
output by mean squared error for ``--steps`` AdamW steps on training batches, then measured on 256 held-out
digits:
- ``error``: mean squared error over the output's variance (``gradient_report``'s consistency error);
- ``vjp cosine (random)``: the cosine of the coupler's and the span's vector-Jacobian products with a random
  probe at the output;
- ``vjp cosine (loss)``: the same with the exact gradient of the task loss at the span's output as the probe,
  the gradient a block upstream of the span receives in training.

Layouts: ``lead`` (the library's coupler: coupling after the adapter's injective lead, here space-to-depth)
and ``input`` (the layout before issue 13: coupling on the full-resolution input, then the whole adapter).

Example:
    python benchmarks/coupler_fit.py --widths 8 64
    python benchmarks/coupler_fit.py --span 2 4 --layouts lead --widths 8
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from models import mnist_resnet
from torch import nn

from hbll_compile.data import load_mnist8k, make_loaders
from hbll_compile.nn.adapters import make_adapter
from hbll_compile.nn.coupling import Coupler

GAIN = 4.0  # HBLLConfig.coupler_gain's default


def _units(net: nn.Module) -> list[nn.Module]:
    return [net.stem, *net.layers]


def _vjp_cosines(span: nn.Module, coupler: nn.Module, rest: nn.Module, h: torch.Tensor,
                 y: torch.Tensor) -> tuple[float, float]:
    h = h.clone().requires_grad_(True)
    out, est = span(h), coupler(h)
    out_leaf = out.detach().requires_grad_(True)
    loss_grad, = torch.autograd.grad(F.cross_entropy(rest(out_leaf), y), out_leaf)
    cosines = []
    for probe in (torch.randn_like(out), loss_grad):
        exact, = torch.autograd.grad(out, h, probe, retain_graph=True)
        approx, = torch.autograd.grad(est, h, probe, retain_graph=True)
        cosines.append(float(F.cosine_similarity(exact.flatten(), approx.flatten(), dim=0)))
    return cosines[0], cosines[1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--span", type=int, nargs=2, default=(4, 6), metavar=("A", "B"))
    p.add_argument("--layouts", nargs="+", default=["lead", "input"], choices=["lead", "input"])
    p.add_argument("--widths", type=int, nargs="+", default=[8, 64])
    p.add_argument("--epochs", type=int, default=1, help="BP training of the network before it is frozen")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    train, test = load_mnist8k(flatten=False)
    torch.manual_seed(args.seed)
    net = mnist_resnet()
    loader, _ = make_loaders(train, test, batch_size=128, seed=args.seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    for _ in range(args.epochs):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
    net.requires_grad_(False)
    units = _units(net)
    a, b = args.span
    before, span = nn.Sequential(*units[:a]), nn.Sequential(*units[a:b])
    rest = nn.Sequential(*units[b:], nn.AdaptiveAvgPool2d(1), nn.Flatten(), net.fc)
    xs = train.tensors[0]
    with torch.no_grad():
        in_shape = tuple(before(xs[:2]).shape[1:])
        out_shape = tuple(span(before(xs[:2])).shape[1:])
        h_test = before(test.tensors[0][:256])
    print(f"span ({a}, {b}]: {in_shape} -> {out_shape}, BP-trained {args.epochs} epoch(s)")
    for layout in args.layouts:
        for width in args.widths:
            torch.manual_seed(args.seed + 1)
            coupler: nn.Module = Coupler(in_shape, out_shape, width, gain=GAIN)
            if layout == "input":
                coupler = nn.Sequential(Coupler(in_shape, in_shape, width, gain=GAIN),
                                        make_adapter(in_shape, out_shape))
            fit = torch.optim.AdamW(coupler.parameters(), lr=1e-3)
            start = time.perf_counter()
            for step in range(args.steps):
                i = (step * 128) % (len(xs) - 128)
                with torch.no_grad():
                    h = before(xs[i:i + 128])
                    target = span(h)
                loss = F.mse_loss(coupler(h), target)
                fit.zero_grad()
                loss.backward()
                fit.step()
            with torch.no_grad():
                target = span(h_test)
                error = float(F.mse_loss(coupler(h_test), target) / target.var())
            random_cos, loss_cos = _vjp_cosines(span, coupler, rest, h_test, test.tensors[1][:256])
            flops = Coupler(in_shape, out_shape, width).flops()
            print(f"{layout:5} width {width:4}  {flops / 1e6:6.2f} MFLOPs  error {error:.3f}  vjp cosine (random) "
                  f"{random_cos:.3f}  (loss) {loss_cos:.3f}  ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
