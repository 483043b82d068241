"""Train a deep, narrow residual MLP on MNIST-8k with HBLL spread over several processes.

Launch from the repository root (2 ranks on CPU; on a machine with GPUs each rank takes its own):
    torchrun --nproc-per-node 2 examples/distributed_resmlp.py --epochs 1

Every rank builds and compiles the same network and reads the same batches; ``hc.distribute`` gives
each rank a contiguous group of blocks (balanced by FLOPs) with the couplers that end there. Only
boundary activations travel, forward; no gradient crosses a rank. Rank 0 prints the placement, the
loss of the deepest block as the last rank sees it, and at the end the held-out accuracy of the
gathered model, which it also saves (``--save``) as a file ``hc.HBLLModel.load`` reads in one process.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from mnist_resmlp import build_model

import hbll_compile as hc
from hbll_compile.data import load_mnist8k, make_loaders


def main(argv: list[str] | None = None) -> float | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=16, help="residual blocks in the network")
    parser.add_argument("--limit", type=int, default=None, help="train on the first K digits only (smoke tests)")
    parser.add_argument("--save", default=None, help="write the trained model here (rank 0)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # one core per rank; ranks share the machine's cores
    train, test = load_mnist8k(flatten=True)
    if args.limit:
        train = torch.utils.data.TensorDataset(*(t[: args.limit] for t in train.tensors))
    torch.manual_seed(args.seed)  # the same initial weights on every rank (distribute also syncs them)
    net = build_model(args.width, args.depth)
    m = hc.hbll_compile(net, (train.tensors[0][:2],), blocks=args.blocks, loss=F.cross_entropy)
    dm = hc.distribute(m)  # reads RANK, WORLD_SIZE, MASTER_ADDR/PORT from torchrun
    rank = dist.get_rank()
    if rank == 0:
        print(dm.describe())
    optimizer = torch.optim.AdamW(dm.parameters(), lr=1e-3)  # this rank's blocks and couplers
    train_loader, test_loader = make_loaders(train, test, batch_size=128, seed=args.seed)  # same batches everywhere
    lead = hc.default_lead(dm)  # as fit does in one process: blocks' weights predicted N/2 steps ahead
    step = 0
    for epoch in range(args.epochs):
        for x, y in train_loader:
            optimizer.zero_grad()
            with hc.predicted_weights(dm, optimizer, lead):
                loss = dm.training_step(x, target=y)
            optimizer.step()
            step += 1
            if rank == dist.get_world_size() - 1 and step % 10 == 0:
                print(f"epoch {epoch} step {step}: loss {loss.item():.4f} (deepest block of the last rank)")
    state = dm.gather_state_dict()
    if args.save:
        dm.save(args.save)
    accuracy = None
    if state is not None:  # rank 0: the whole trained model
        m.load_state_dict(state)
        m.eval()
        with torch.no_grad():
            correct = sum(int((m(x).argmax(1) == y).sum()) for x, y in test_loader)
        accuracy = correct / len(test)
        print(f"held-out accuracy after {step} steps on {dist.get_world_size()} ranks: {100 * accuracy:.2f}%")
    dist.destroy_process_group()
    return accuracy


if __name__ == "__main__":
    main()
