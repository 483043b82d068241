"""Property tests (hypothesis): random layered DAG models, random N; DESIGN §6 invariants."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import hbll_compile as hc
from hbll_compile.errors import CutError
from hbll_compile.passes.capture import capture
from hbll_compile.passes.graph import build_graph
from hbll_compile.passes.hierarchy import build_tree
from hbll_compile.passes.partition import choose_cuts, max_blocks

LAYER = st.one_of(
    st.tuples(st.just("linear"), st.integers(3, 12)),
    st.tuples(st.just("residual"), st.integers(3, 12)),
    st.tuples(st.just("branch"), st.lists(st.integers(2, 6), min_size=2, max_size=3)),
)


class RandomDAG(nn.Module):
    """Layers of three kinds: plain linear, residual (x + f(x)), and concatenated parallel branches."""

    def __init__(self, d_in: int, layers: list[tuple]) -> None:
        super().__init__()
        self.kinds = [kind for kind, _ in layers]
        self.mods = nn.ModuleList()
        width = d_in
        for kind, arg in layers:
            if kind == "linear":
                self.mods.append(nn.Linear(width, arg))
                width = arg
            elif kind == "residual":
                self.mods.append(nn.Sequential(nn.Linear(width, arg), nn.Tanh(), nn.Linear(arg, width)))
            else:
                self.mods.append(nn.ModuleList(nn.Linear(width, w) for w in arg))
                width = sum(arg)
        self.out = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for kind, mod in zip(self.kinds, self.mods):
            if kind == "linear":
                x = torch.tanh(mod(x))
            elif kind == "residual":
                x = x + mod(x)
            else:
                x = torch.cat([torch.tanh(branch(x)) for branch in mod], dim=-1)
        return self.out(x)


def _check_tree(tree, n: int) -> None:
    assert tree.depth == (math.ceil(math.log2(n)) if n > 1 else 0)
    for node in tree.internal_nodes:
        left, right = (tree.nodes[c] for c in node.children)
        assert left.span[0] == node.span[0] and right.span[1] == node.span[1]
        assert left.span[1] == right.span[0]  # one split boundary, the two halves make the parent
    for i in range(n + 1):
        path = tree.path(i)
        assert len(path) <= max(tree.depth, 1)
        start = i
        for node in path:
            assert node.span[0] == start
            start = node.span[1]
        assert start == n
    for d in range(tree.depth + 1):
        frontier = tree.nodes_at_depth(d)
        assert [s for node in frontier for s in node.span][1:-1:2] == [s for node in frontier for s in node.span][2::2]
        assert frontier[0].span[0] == 0 and frontier[-1].span[1] == n


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layers=st.lists(LAYER, min_size=1, max_size=6), data=st.data())
def test_random_dag_models(layers: list[tuple], data: st.DataObject) -> None:
    torch.manual_seed(0)
    model = RandomDAG(5, layers)
    example = (torch.randn(4, 5),)
    view = build_graph(capture(model, example).gm)
    n = data.draw(st.integers(1, max_blocks(view.block_cuts, view.owns_params)), label="blocks")
    m = hc.hbll_compile(model, example, blocks=n)

    # every compute node in exactly one block; context nodes only in the context graph
    block_nodes = [name for spec in m.specs for name in spec.nodes]
    assert sorted(block_nodes) == sorted(view.sequence) and len(set(block_nodes)) == len(block_nodes)
    assert not set(block_nodes) & set(view.context)

    # blocks respect topological order: a block reads stateful values only from itself or earlier blocks
    block_of = {name: spec.index for spec in m.specs for name in spec.nodes}
    for name, i in block_of.items():
        for pred in view.dag.predecessors(name):
            assert block_of.get(pred, 0) <= i

    # the composition equals the original
    x = torch.randn(6, 5)
    m.eval()
    torch.testing.assert_close(m(x), model(x), rtol=0, atol=1e-5)

    # every block owns a parameter, and the partition is optimal (brute force over the allowed cuts)
    assert all(spec.param_count > 0 for spec in m.specs)
    assert max(m.report.block_costs) == _brute_force(view.costs, view.block_cuts, view.owns_params, n)
    _check_tree(m.tree, n)


def _brute_force(costs: list[int], legal: list[int], owns_params: list[bool], n: int) -> int | None:
    """The smallest largest-block cost over every choice of n-1 legal cuts that leaves a node owning
    parameters in every block; None when no choice does."""
    costs_of_allowed = [
        max(sum(costs[a:b]) for a, b in zip((0, *cuts), (*cuts, len(costs))))
        for cuts in itertools.combinations(legal, n - 1)
        if all(any(owns_params[a:b]) for a, b in zip((0, *cuts), (*cuts, len(costs))))
    ]
    return min(costs_of_allowed, default=None)


@settings(max_examples=300, deadline=None)
@given(costs=st.lists(st.integers(0, 50), min_size=1, max_size=10), data=st.data())
def test_partition_is_exactly_optimal(costs: list[int], data: st.DataObject) -> None:
    legal = sorted(data.draw(st.sets(st.integers(1, len(costs) - 1)), label="legal")) if len(costs) > 1 else []
    owns = data.draw(st.lists(st.booleans(), min_size=len(costs), max_size=len(costs)), label="owns_params")
    n = data.draw(st.integers(1, len(legal) + 1), label="n")
    best = _brute_force(costs, legal, owns, n)
    if best is None:  # more blocks than pieces with parameters: refused, with the true maximum
        with pytest.raises(CutError) as info:
            choose_cuts(costs, legal, n, owns)
        most = max(k for k in range(len(legal) + 2) if k == 0 or _brute_force(costs, legal, owns, k) is not None)
        assert info.value.max_blocks == most == max_blocks(legal, owns)
        return
    part = choose_cuts(costs, legal, n, owns)
    assert len(part.cuts) == n - 1 and set(part.cuts) <= set(legal)
    assert list(part.cuts) == sorted(part.cuts)
    bounds = (0, *part.cuts, len(costs))
    assert part.block_costs == tuple(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))
    assert all(any(owns[a:b]) for a, b in zip(bounds, bounds[1:]))
    assert part.max_cost == best


@settings(max_examples=200, deadline=None)
@given(costs=st.lists(st.integers(1, 100), min_size=1, max_size=70))
def test_tree_invariants(costs: list[int]) -> None:
    _check_tree(build_tree(costs), len(costs))
