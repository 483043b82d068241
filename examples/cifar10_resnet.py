"""Train a ResNet with BatchNorm on CIFAR-10 with HBLL (and BP for comparison).

Run from the repository root, with the standard CIFAR-10 python batches extracted under PATH:
    python examples/cifar10_resnet.py --data PATH --epochs 10 --blocks 8

``PATH`` may be the folder that holds ``cifar-10-batches-py`` or that folder itself. Without the
files, the script downloads them with torchvision when torchvision is installed and the machine is
online; otherwise it says where to put them. ``--limit`` trains on the first K images only (for a
smoke test).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import hbll_compile as hc
from hbll_compile.data import load_cifar10, make_loaders


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet-20 style: a stem and three stages of ``per_stage`` basic blocks (two downsampling)."""

    def __init__(self, width: int = 16, per_stage: int = 3, classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        layers, c = [], width
        for stage, c_out in enumerate((width, 2 * width, 4 * width)):
            for k in range(per_stage):
                layers.append(BasicBlock(c, c_out, 2 if stage > 0 and k == 0 else 1))
                c = c_out
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1))


def build_model() -> nn.Module:
    return ResNet()


def load(path: str) -> tuple[torch.utils.data.TensorDataset, torch.utils.data.TensorDataset]:
    """Load the local batches, or download them with torchvision when it is installed."""
    try:
        return load_cifar10(path)
    except FileNotFoundError as missing:
        try:
            import torchvision
        except ImportError:
            raise missing from None
        torchvision.datasets.CIFAR10(path, download=True)
        return load_cifar10(path)


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--limit", type=int, default=None, help="use only the first K training and test images")
    p.add_argument("--objectives", nargs="+", default=["bp", "hbll"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    train, test = load(args.data)
    if args.limit:
        train = torch.utils.data.TensorDataset(*(t[: args.limit] for t in train.tensors))
        test = torch.utils.data.TensorDataset(*(t[: args.limit] for t in test.tensors))
    results = {}
    for objective in args.objectives:
        torch.manual_seed(args.seed)
        m = hc.hbll_compile(build_model(), (train.tensors[0][:2],), blocks=args.blocks, loss=F.cross_entropy,
                            config=hc.HBLLConfig(objective=objective, seed=args.seed))
        train_loader, test_loader = make_loaders(train, test, batch_size=args.batch, seed=args.seed)
        history = m.fit(train_loader, args.epochs, torch.optim.AdamW(m.parameters(), lr=1e-3), eval_loader=test_loader)
        results[objective] = history["eval_accuracy"][-1]
        print(f"{objective}: test accuracy {100 * results[objective]:.2f}% "
              f"(critical path {m.schedule.critical_path()})")
    return results


if __name__ == "__main__":
    main()
