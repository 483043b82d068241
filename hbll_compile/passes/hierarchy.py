"""Build the balanced binary tree over blocks 1..N (DESIGN §1, "Tree").

Each span is split at the block boundary nearest its cost midpoint, among the boundaries that keep
the whole tree's depth at ceil(log2 N): a span at depth d may only have children of at most
2**(L-d-1) blocks each.

Example:
    >>> tree = build_tree([1, 1, 1, 5])
    >>> tree.depth, [n.span for n in tree.nodes_at_depth(1)]
    (2, [(0, 2), (2, 4)])
"""

from __future__ import annotations

from itertools import accumulate

from hbll_compile.ir import Span, Tree

__all__ = ["build_tree"]


def build_tree(block_costs: list[int] | tuple[int, ...]) -> Tree:
    """Return the balanced :class:`~hbll_compile.ir.Tree` for blocks with these costs."""
    n = len(block_costs)
    if n < 1:
        raise ValueError("a tree needs at least one block")
    depth = Tree.required_depth(n)
    prefix = [0, *accumulate(block_costs)]
    splits: dict[Span, int] = {}

    def split(span: Span, d: int) -> None:
        a, b = span
        if b - a < 2:
            return
        child_cap = 1 << (depth - d - 1)
        candidates = range(max(a + 1, b - child_cap), min(b - 1, a + child_cap) + 1)
        half = (prefix[a] + prefix[b]) / 2
        mid_count = (a + b) / 2
        s = min(candidates, key=lambda c: (abs(prefix[c] - half), abs(c - mid_count), c))
        splits[span] = s
        split((a, s), d + 1)
        split((s, b), d + 1)

    split((0, n), 0)
    return Tree.from_splits(n, splits)
