"""Exact min-max partition of the compute sequence into N contiguous blocks at legal cuts.

The legal cuts split the sequence into *atoms* that may not be divided. Choosing N-1 of the cuts so
that the costliest block is as cheap as possible is the linear partition problem; for integer costs a
binary search on the bound with a greedy feasibility check is exact. Among optimal partitions the one
returned packs blocks greedily from the left.

``blocks=None`` picks N automatically: the largest power of two not above ``min(8, max_blocks)``,
so that the tree is perfectly balanced.

Example:
    >>> choose_cuts(costs=[4, 1, 1, 4, 2, 2], legal_cuts=[1, 2, 3, 4, 5], n_blocks=3)
    Partition(cuts=(2, 4), block_costs=(5, 5, 4))
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

from hbll_compile.errors import CutError

AUTO_MAX_BLOCKS = 8


@dataclass(frozen=True)
class Partition:
    """``cuts`` are sequence positions (see :class:`~hbll_compile.passes.graph.GraphView`)."""

    cuts: tuple[int, ...]
    block_costs: tuple[int, ...]

    @property
    def max_cost(self) -> int:
        return max(self.block_costs)


def auto_blocks(max_blocks: int) -> int:
    """The default N: the largest power of two not above ``min(AUTO_MAX_BLOCKS, max_blocks)``."""
    limit = max(1, min(AUTO_MAX_BLOCKS, max_blocks))
    return 1 << (limit.bit_length() - 1)


def choose_cuts(costs: list[int], legal_cuts: list[int], n_blocks: int | None) -> Partition:
    """Pick ``n_blocks - 1`` of ``legal_cuts`` minimising the largest block cost (exactly)."""
    bounds = [0, *sorted(legal_cuts), len(costs)]
    prefix = [0, *accumulate(costs)]
    atoms = [prefix[b] - prefix[a] for a, b in zip(bounds, bounds[1:])]
    max_blocks = len(atoms)
    n = auto_blocks(max_blocks) if n_blocks is None else n_blocks
    if n < 1:
        raise CutError(f"blocks must be at least 1, got {n}", remedy="pass blocks=None or a positive integer")
    if n > max_blocks:
        raise CutError(
            f"asked for {n} blocks but the model has only {len(legal_cuts)} legal cuts, "
            f"so at most {max_blocks} blocks",
            node="blocks",
            remedy=f"pass blocks <= {max_blocks} (a legal cut needs exactly one parameter-dependent tensor "
            "crossing it; residual and branch regions cannot be cut)",
        )
    lo, hi = max(atoms), sum(atoms)
    while lo < hi:
        mid = (lo + hi) // 2
        if _min_blocks(atoms, mid) <= n:
            hi = mid
        else:
            lo = mid + 1
    groups = _pack(atoms, lo, n)
    cuts, block_costs, start = [], [], 0
    for size in groups:
        block_costs.append(sum(atoms[start:start + size]))
        start += size
        cuts.append(bounds[start])
    return Partition(cuts=tuple(cuts[:-1]), block_costs=tuple(block_costs))


def _min_blocks(atoms: list[int], bound: int) -> int:
    count, load = 1, 0
    for a in atoms:
        if load + a > bound:
            count, load = count + 1, 0
        load += a
    return count


def _pack(atoms: list[int], bound: int, n: int) -> list[int]:
    """Greedy left packing under ``bound`` that opens a new block early when atoms would run out."""
    groups: list[int] = []
    load, size = 0, 0
    for i, a in enumerate(atoms):
        atoms_left = len(atoms) - i
        blocks_to_open = n - len(groups) - 1
        if size and (load + a > bound or atoms_left == blocks_to_open):
            groups.append(size)
            load, size = 0, 0
        load += a
        size += 1
    groups.append(size)
    return groups
