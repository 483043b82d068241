"""Plain data shared by the passes and the runtime.

Nothing here imports a pass or the runtime: passes *produce* these objects and the
runtime *reads* them.

Example:
    >>> tree = Tree.from_splits(n_blocks=4, splits={(0, 4): 2, (0, 2): 1, (2, 4): 3})
    >>> tree.depth
    2
    >>> [n.span for n in tree.path(1)]
    [(1, 2), (2, 4)]
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = ["BlockSpec", "Boundary", "CompileReport", "CouplerPlan", "Emission", "Span", "Tail", "Tree", "TreeNode"]

Span = tuple[int, int]
"""A half-open interval ``(a, b]`` of blocks: the node covers blocks a+1 .. b."""


@dataclass(frozen=True)
class Boundary:
    """The tensor ``h_i`` that crosses the cut after block ``index``; ``shape`` is per sample (no batch dim).

    ``index`` 0 is the model input and ``index`` N the model output.
    """

    index: int
    node: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class BlockSpec:
    """What the partition decided for one block (1-based ``index``)."""

    index: int
    nodes: tuple[str, ...]
    flops: int
    param_count: int
    context: tuple[str, ...]
    """Names of the context values (model inputs or parameter-free functions of them) it reads."""
    sample_flops: float = 0.0
    """``flops`` per sample: ``flops`` is counted on the example batch."""


@dataclass(frozen=True)
class Emission:
    """Over time, a model whose output stacks an output of every time step (a language model, DESIGN §4):
    each chunk *emits* the outputs of its own steps, and the model output is their concatenation along
    ``dim``. Block i then returns ``(h_i, e_i)``, ``e_i`` its steps' outputs stacked along ``dim``, and
    boundary N is the last chunk's final state; the :class:`Tail` is the *step readout*, the map from one
    step's state to that step's output."""

    dim: int
    """The time dimension of the model output (and of the target)."""
    steps: tuple[int, ...]
    """How many time steps chunk i emits, ``steps[i - 1]``."""
    step_shape: tuple[int, ...]
    """The per-sample shape of one step's output (no batch dim, no time dim)."""

    @property
    def length(self) -> int:
        return sum(self.steps)

    def span(self, i: int) -> tuple[int, int]:
        """The half-open range of time steps chunk i (1-based) emits."""
        start = sum(self.steps[:i - 1])
        return start, start + self.steps[i - 1]


@dataclass(frozen=True)
class Tail:
    """The model's output tail: the end of block N from the cut ``passes.lower.tail_cut`` chooses (with
    ``output_tail="auto"``, the last legal cut before any normalisation the head reads), or all of
    block N. Couplers whose span ends at the output write ``input`` and then run the tail.

    ``input.index`` is N-1 when the tail is all of block N (its input is boundary N-1), else N (a cut
    inside block N); ``spec`` describes the tail's nodes, FLOPs and context reads like a block's.
    """

    input: Boundary
    spec: BlockSpec

    @property
    def is_whole_block(self) -> bool:
        return self.input.index < self.spec.index


@dataclass(frozen=True)
class TreeNode:
    """A node of the block tree. Leaves cover one block; internal nodes own a coupler."""

    id: int
    span: Span
    depth: int
    children: tuple[int, ...] = ()

    @property
    def is_leaf(self) -> bool:
        return not self.children

    @property
    def size(self) -> int:
        return self.span[1] - self.span[0]


@dataclass
class Tree:
    """A balanced binary tree over blocks 1..N, stored as a flat list of nodes (root first).

    Build one with :func:`hbll_compile.passes.hierarchy.build_tree`, or with
    :meth:`Tree.from_splits` from explicit split points.
    """

    n_blocks: int
    nodes: list[TreeNode] = field(default_factory=list)

    @classmethod
    def from_splits(cls, n_blocks: int, splits: dict[Span, int]) -> Tree:
        """Build a tree from ``{span: split_boundary}`` for every internal span."""
        tree = cls(n_blocks=n_blocks)

        def add(span: Span, depth: int) -> int:
            node_id = len(tree.nodes)
            tree.nodes.append(TreeNode(node_id, span, depth, ()))
            if span[1] - span[0] > 1:
                s = splits[span]
                if not span[0] < s < span[1]:
                    raise ValueError(f"split {s} does not lie strictly inside span {span}")
                left = add((span[0], s), depth + 1)
                right = add((s, span[1]), depth + 1)
                old = tree.nodes[node_id]
                tree.nodes[node_id] = TreeNode(old.id, old.span, old.depth, (left, right))
            return node_id

        add((0, n_blocks), 0)
        return tree

    @property
    def root(self) -> TreeNode:
        return self.nodes[0]

    @property
    def depth(self) -> int:
        """Length of the longest root-to-leaf path (0 for a single block)."""
        return max(n.depth for n in self.nodes)

    @property
    def internal_nodes(self) -> list[TreeNode]:
        return [n for n in self.nodes if not n.is_leaf]

    @property
    def leaves(self) -> list[TreeNode]:
        """Leaves in block order; ``leaves[i-1]`` covers block i."""
        return sorted((n for n in self.nodes if n.is_leaf), key=lambda n: n.span)

    def node(self, span: Span) -> TreeNode:
        for n in self.nodes:
            if n.span == span:
                return n
        raise KeyError(f"no tree node covers span {span}")

    def __iter__(self) -> Iterator[TreeNode]:
        return iter(self.nodes)

    def nodes_at_depth(self, d: int) -> list[TreeNode]:
        """The frontier at depth d: nodes of depth d, plus leaves where the tree is shallower.

        Their spans tile (0, N] in order; this is the depth-d subnetwork.
        """
        if d < 0:
            raise ValueError(f"depth must be >= 0, got {d}")
        frontier = [n for n in self.nodes if n.depth == d or (n.is_leaf and n.depth < d)]
        return sorted(frontier, key=lambda n: n.span)

    def path(self, i: int) -> list[TreeNode]:
        """The hierarchical path P(i -> N): the largest tree nodes that tile (i, N], in order.

        It has at most ``depth`` nodes for 0 < i < N, is empty for i == N, and is the root for i == 0.
        """
        if not 0 <= i <= self.n_blocks:
            raise ValueError(f"boundary {i} is outside 0..{self.n_blocks}")
        out: list[TreeNode] = []
        start = i
        while start < self.n_blocks:
            best = max((n for n in self.nodes if n.span[0] == start), key=lambda n: n.size)
            out.append(best)
            start = best.span[1]
        return out

    def levels(self) -> list[list[TreeNode]]:
        """Nodes grouped by depth, root level first."""
        return [[n for n in self.nodes if n.depth == d] for d in range(self.depth + 1)]

    @staticmethod
    def required_depth(n_blocks: int) -> int:
        return math.ceil(math.log2(n_blocks)) if n_blocks > 1 else 0


@dataclass(frozen=True)
class CouplerPlan:
    """What the couplers pass built for one internal tree node; the runtime and the exporters read it
    instead of re-deriving it (see :mod:`hbll_compile.passes.couplers`)."""

    node: int
    span: Span
    source: int
    """The boundary the learned part reads: ``span[0]``, or later when the coupler first runs blocks
    ``span[0]+1..source`` exactly (block 1 on token ids, ``HBLLConfig.coupler_copies``)."""
    sink: int
    """The boundary the learned part writes: ``span[1]``, or the tail's input (``Tail.input.index``)."""
    runs_tail: bool
    """Whether the model's output tail finishes the coupler (spans that end at the output)."""
    budget: int
    """Per-sample FLOP budget of the learned part."""
    flops: int
    """Per-sample FLOPs of the learned part as built."""
    hidden: int
    condition: tuple[str, ...] = ()
    """Over time (DESIGN §4): the context values (the per-step inputs of the span's chunks) whose
    flattened concatenation the coupler's encoder summarises into its condition; empty over depth."""


@dataclass(frozen=True)
class CompileReport:
    """What compiling found, for ``describe``/``inspect``, persistence and export.

    ``example_inputs`` holds each example input's shape (batch first) and dtype name, so a compiled
    model can be rebuilt (``HBLLModel.load``) and exported without the original tensors.
    """

    capture: str
    """``"export"`` or ``"fx"``: which capture succeeded."""
    legal_cuts: int
    max_blocks: int
    block_costs: tuple[int, ...]
    context: tuple[str, ...]
    example_batch: int
    example_inputs: tuple[tuple[tuple[int, ...], str], ...]
