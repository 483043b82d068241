"""How far BatchNorm running averages trail the weights: held-out accuracy of the MNIST ResNet three ways.

After every epoch of ``m.fit`` (run with ``recalibrate_bn=0``, so training leaves its running averages)
it prints the held-out accuracy (all 1,600 held-out digits)
- in eval mode with the running averages training left,
- in train mode (every BatchNorm normalises with the held-out batch's own statistics),
- in eval mode after ``m.recalibrate_batchnorm`` on the first 20 training batches of 128 (always the same
  digits, so the loader's shuffle is not disturbed); the model's own statistics are restored afterwards,
  so training continues exactly as without the check.

Example:
    python benchmarks/bn_stats.py --objective hbll --blocks 8 --epochs 3
    python benchmarks/bn_stats.py --objective bp --blocks 8 --epochs 3 --config '{}'
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from models import mnist_resnet

import hbll_compile as hc
from hbll_compile.data import load_mnist8k, make_loaders


@torch.no_grad()
def _accuracy(m: hc.HBLLModel, x: torch.Tensor, y: torch.Tensor, batch_statistics: bool) -> float:
    m.train(batch_statistics)
    correct = sum(int((m(x[i:i + 400]).argmax(-1) == y[i:i + 400]).sum()) for i in range(0, len(y), 400))
    m.train()
    return 100 * correct / len(y)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--objective", default="hbll", choices=["bp", "dgl", "hbll"])
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", type=json.loads, default={}, help="HBLLConfig fields as JSON")
    p.add_argument("--limit", type=int, default=None, help="train on the first K digits only (smoke runs)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    train, test = load_mnist8k(flatten=False)
    if args.limit:
        train = torch.utils.data.TensorDataset(*(t[: args.limit] for t in train.tensors))
    torch.manual_seed(args.seed)
    m = hc.hbll_compile(mnist_resnet(), (train.tensors[0][:2],), blocks=args.blocks, loss=F.cross_entropy,
                        config=hc.HBLLConfig(objective=args.objective, seed=args.seed, **args.config))
    train_loader, _ = make_loaders(train, test, batch_size=128, seed=args.seed)
    optimizer = torch.optim.AdamW(m.parameters(), lr=1e-3)
    calibration = [(train.tensors[0][i:i + 128], train.tensors[1][i:i + 128])
                   for i in range(0, min(2560, len(train)), 128)]
    x, y = test.tensors
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        m.fit(train_loader, 1, optimizer, progress=False, recalibrate_bn=0)
        running, batch = _accuracy(m, x, y, False), _accuracy(m, x, y, True)
        kept = {k: v.clone() for k, v in m.state_dict().items()}
        m.recalibrate_batchnorm(calibration)
        recalibrated = _accuracy(m, x, y, False)
        m.load_state_dict(kept)
        print(f"{args.objective} N={args.blocks} {args.config} epoch {epoch}: running averages {running:.2f}, "
              f"batch statistics {batch:.2f}, recalibrated {recalibrated:.2f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
