"""Exact min-max partition of the compute sequence into N contiguous blocks at legal cuts.

Rules:
- the legal cuts split the sequence into *atoms* that may not be divided;
- every block holds at least one node that owns parameters: a block without parameters has nothing to
  train, yet costs a tree level and a coupler on every path (a lone ReLU or average pooling was a whole
  block before this rule). So the most blocks a model allows is its number of *parameterised atoms*,
  and parameter-free atoms always join a neighbour;
- among the allowed choices of N-1 cuts, the partition minimises the costliest block exactly, and among
  optimal partitions packs blocks greedily from the left (each block as large as the rest allows).

The bound on the costliest block is found by binary search; for each bound a linear sweep counts the
fewest blocks that respect it (a sliding-window minimum over the cut positions that keep a parameter in
the block). Any count from that minimum up to the number of parameterised atoms is then reachable too:
a block holding two parameterised atoms can be split between them.

``blocks=None`` picks N with :func:`auto_blocks`.

Example:
    >>> choose_cuts(costs=[4, 1, 1, 4, 2, 2], legal_cuts=[1, 2, 3, 4, 5], n_blocks=3, owns_params=[True] * 6)
    Partition(cuts=(2, 4), block_costs=(5, 5, 4), max_blocks=6)
    >>> choose_cuts([4, 1, 1, 4, 2, 2], [1, 2, 3, 4, 5], 3, owns_params=[True, False, False, False, True, True])
    Partition(cuts=(3, 5), block_costs=(6, 6, 2), max_blocks=3)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

from hbll_compile.errors import CutError

__all__ = ["AUTO_MAX_BLOCKS", "AUTO_MIN_SHARE", "Partition", "auto_blocks", "choose_cuts", "max_blocks"]

AUTO_MAX_BLOCKS = 8
AUTO_MIN_SHARE = 0.25
"""With ``blocks=None`` every block gets at least this fraction of its fair share, total cost / N."""

_UNREACHABLE = 1 << 62


@dataclass(frozen=True)
class Partition:
    """``cuts`` are sequence positions (see :class:`~hbll_compile.passes.graph.GraphView`);
    ``max_blocks`` is the most blocks the same sequence allows."""

    cuts: tuple[int, ...]
    block_costs: tuple[int, ...]
    max_blocks: int

    @property
    def max_cost(self) -> int:
        return max(self.block_costs)


def max_blocks(legal_cuts: Sequence[int], owns_params: Sequence[bool]) -> int:
    """The most blocks that each own a parameter: the number of atoms that hold a parameter-owning node.

    >>> max_blocks([1, 2], [True, False, True])
    2
    """
    return sum(_atoms(legal_cuts, [0] * len(owns_params), owns_params)[1])


def auto_blocks(costs: Sequence[int], legal_cuts: Sequence[int], owns_params: Sequence[bool]) -> int:
    """The default N: the largest power of two N <= min(8, max_blocks) whose optimal partition gives
    every block at least a quarter of its fair share (``AUTO_MIN_SHARE * total cost / N``), and at least
    2 when the model allows 2 (one split adds a single coupler level, so even an uneven pair is cheap).

    Why: a block far below its share takes no work off the others (the critical path stays that of the
    big blocks) but still adds a tree level, with one more coupler on every path and one more stale
    input. The measurements behind the quarter are in BENCHMARKS.md (issue 12).

    >>> auto_blocks([10] * 16, list(range(1, 16)), [True] * 16)
    8
    >>> auto_blocks([100, 100, 100, 100, 1, 1, 1, 1], list(range(1, 8)), [True] * 8)
    4
    >>> auto_blocks([100, 1], [1], [True, True])
    2
    """
    total = sum(costs)
    most = max_blocks(legal_cuts, owns_params)
    n = 1 << (max(1, min(AUTO_MAX_BLOCKS, most)).bit_length() - 1)
    while n > 2 and n * min(choose_cuts(costs, legal_cuts, n, owns_params).block_costs) < AUTO_MIN_SHARE * total:
        n //= 2
    return n


def choose_cuts(
    costs: Sequence[int], legal_cuts: Sequence[int], n_blocks: int | None, owns_params: Sequence[bool]
) -> Partition:
    """Pick ``n_blocks - 1`` of ``legal_cuts``, every block owning a parameter, minimising the largest
    block cost (exactly). Raises :class:`CutError` (with ``max_blocks``) when that is impossible."""
    if n_blocks is None:
        n_blocks = auto_blocks(costs, legal_cuts, owns_params)
    bounds = [0, *sorted(legal_cuts), len(costs)]
    atoms, params = _atoms(legal_cuts, costs, owns_params)
    most = sum(params)
    if n_blocks < 1:
        raise CutError(f"blocks must be at least 1, got {n_blocks}", node="blocks",
                       remedy="pass blocks=None or a positive integer")
    if n_blocks > most:
        raise CutError(
            f"asked for {n_blocks} blocks but the model has {len(legal_cuts)} legal cuts and "
            f"{most} pieces with parameters between them, so at most {most} blocks",
            node="blocks",
            remedy=f"pass blocks <= {most} (every block needs a layer with parameters, and a legal cut needs "
            "exactly one parameter-dependent tensor crossing it; residual and branch regions cannot be cut)",
            max_blocks=most,
        )
    lo, hi = max(atoms), sum(atoms)
    while lo < hi:
        mid = (lo + hi) // 2
        if _fewest_blocks(atoms, params, mid)[-1] <= n_blocks:
            hi = mid
        else:
            lo = mid + 1
    ends = _pack(atoms, params, lo, n_blocks)
    block_costs = tuple(sum(atoms[a:b]) for a, b in zip((0, *ends), ends))
    return Partition(cuts=tuple(bounds[e] for e in ends[:-1]), block_costs=block_costs, max_blocks=most)


def _atoms(
    legal_cuts: Sequence[int], costs: Sequence[int], owns_params: Sequence[bool]
) -> tuple[list[int], list[bool]]:
    """Cost and parameter ownership of each piece between consecutive legal cuts."""
    bounds = [0, *sorted(legal_cuts), len(costs)]
    prefix = [0, *accumulate(costs)]
    spans = list(zip(bounds, bounds[1:]))
    return [prefix[b] - prefix[a] for a, b in spans], [any(owns_params[a:b]) for a, b in spans]


def _fewest_blocks(atoms: Sequence[int], params: Sequence[bool], bound: int) -> list[int]:
    """``g[j]``: the fewest blocks of cost <= ``bound``, each holding a parameterised atom, that tile
    ``atoms[:j]`` (``_UNREACHABLE`` when none do).

    The last block ``atoms[i:j]`` is allowed for i in a window ``[lo, hi]``: ``lo`` is the first start
    within the bound and ``hi`` the last parameterised atom before j. Both only grow with j, so a
    monotone deque gives each window's minimum in amortised O(1).
    """
    prefix = [0, *accumulate(atoms)]
    g = [0] + [_UNREACHABLE] * len(atoms)
    window: deque[int] = deque()
    lo, pushed = 0, 0
    for j in range(1, len(atoms) + 1):
        if params[j - 1]:
            while pushed < j:  # every start up to atom j-1 now keeps a parameter in the block
                while window and g[window[-1]] >= g[pushed]:
                    window.pop()
                window.append(pushed)
                pushed += 1
        while prefix[j] - prefix[lo] > bound:
            lo += 1
        while window and window[0] < lo:
            window.popleft()
        if window and g[window[0]] < _UNREACHABLE:
            g[j] = g[window[0]] + 1
    return g


def _pack(atoms: list[int], params: list[bool], bound: int, n: int) -> list[int]:
    """End positions (in atoms) of ``n`` blocks under ``bound``, each block as long as the rest allows.

    The atoms after position j can take k blocks iff ``fewest[j] <= k <= parameterised atoms after j``.
    """
    count = len(atoms)
    fewest = _fewest_blocks(atoms[::-1], params[::-1], bound)[::-1]
    prefix, owned = [0, *accumulate(atoms)], [0, *accumulate(params)]
    ends, start = [], 0
    for rest in range(n - 1, 0, -1):
        start = max(j for j in range(start + 1, count) if prefix[j] - prefix[start] <= bound
                    and owned[j] > owned[start] and fewest[j] <= rest <= owned[count] - owned[j])
        ends.append(start)
    return [*ends, count]
