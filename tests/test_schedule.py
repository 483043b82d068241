"""Schedules: validity, the DESIGN §2 critical paths, and one update per block and coupler."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hbll_compile.ir import Span, Tree
from hbll_compile.runtime.schedule import (
    Schedule,
    ScheduleError,
    Task,
    TaskKind,
    Unit,
    UnitKind,
    Value,
    build_bp,
    build_dgl,
    build_hbll,
)

SIZES = [1, 2, 3, 4, 5, 8, 16, 64]
KS = [0, 1, 2]


def midpoint_tree(n: int) -> Tree:
    """Split every span at its midpoint, left half rounded up (the leftmost leaf is at depth L)."""
    splits: dict[Span, int] = {}

    def split(a: int, b: int) -> None:
        if b - a > 1:
            s = (a + b + 1) // 2
            splits[(a, b)] = s
            split(a, s)
            split(s, b)

    split(0, n)
    return Tree.from_splits(n, splits)


@st.composite
def valid_trees(draw: st.DrawFn) -> Tree:
    """Any tree of depth ceil(log2 N): a child at depth d + 1 holds at most 2**(L-d-1) blocks."""
    n = draw(st.integers(1, 100))
    depth = Tree.required_depth(n)
    splits: dict[Span, int] = {}

    def split(a: int, b: int, d: int) -> None:
        if b - a > 1:
            cap = 1 << (depth - d - 1)
            s = draw(st.integers(max(a + 1, b - cap), min(b - 1, a + cap)))
            splits[(a, b)] = s
            split(a, s, d + 1)
            split(s, b, d + 1)

    split(0, n, 0)
    return Tree.from_splits(n, splits)


def longest_path(tree: Tree) -> int:
    """P: the most couplers on any block's hierarchical path (L for midpoint trees)."""
    return max(len(tree.path(i)) for i in range(1, tree.n_blocks + 1))


def tasks(schedule: Schedule) -> list[Task]:
    return schedule.tasks()


def texts(values: tuple[Value, ...]) -> tuple[str, ...]:
    return tuple(map(str, values))


UPDATES = (TaskKind.BLOCK_UPDATE, TaskKind.COUPLER_UPDATE, TaskKind.HEAD_UPDATE)


def check_updates(schedule: Schedule, tree: Tree, heads: bool) -> None:
    """One update per block and coupler; with heads, blocks 1..N-1 fuse their head into their update."""
    updates = [t for t in tasks(schedule) if t.kind in UPDATES]
    units = Counter(t.unit for t in updates) + Counter(t.head for t in updates if t.head is not None)
    expected = Counter(
        [Unit.block(i) for i in range(1, tree.n_blocks + 1)]
        + [Unit.coupler(v.id) for v in tree.internal_nodes]
        + ([Unit.head(i) for i in range(1, tree.n_blocks)] if heads else [])
    )
    assert units == expected


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("k", KS)
def test_tree_mode_matches_design(n: int, k: int) -> None:
    tree = midpoint_tree(n)
    L = tree.depth
    assert L == Tree.required_depth(n)
    schedule = build_hbll(tree, inputs="tree", corrections=k)
    schedule.validate()
    assert schedule.critical_path() == (k + 3) * L + 2
    assert len(schedule) == (k + 1) * L + 1
    check_updates(schedule, tree, heads=False)


@pytest.mark.parametrize("n", SIZES)
def test_wavefront_mode_matches_design(n: int) -> None:
    tree = midpoint_tree(n)
    schedule = build_hbll(tree, inputs="wavefront", corrections=2)
    schedule.validate()
    assert schedule.critical_path() == 2 * tree.depth + 2
    assert len(schedule) == 1
    check_updates(schedule, tree, heads=False)


@pytest.mark.parametrize("n", SIZES)
def test_baselines(n: int) -> None:
    bp, dgl = build_bp(n), build_dgl(n)
    assert bp.critical_path() == bp.critical_path(dataflow=True) == 2 * n == len(bp)
    assert dgl.critical_path() == (n + 3 if n > 1 else 2)
    assert len(dgl) == n
    assert Counter(t.kind for t in tasks(dgl)) == Counter(
        {TaskKind.BLOCK_FORWARD: n - 1, TaskKind.HEAD_UPDATE: n - 1, TaskKind.BLOCK_UPDATE: 1}
    )


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("k", KS)
def test_jacobi_sweeps_take_one_stage(n: int, k: int) -> None:
    tree = midpoint_tree(n)
    L = tree.depth
    schedule = build_hbll(tree, inputs="tree", corrections=k, correction="jacobi")
    sweeps = k if n > 1 else 0
    assert len(schedule) == L + sweeps + 1
    assert schedule.critical_path() == L + sweeps + 2 * L + 2


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("inputs", ["tree", "wavefront"])
def test_heads_join_the_updates_of_inner_blocks(n: int, inputs: str) -> None:
    tree = midpoint_tree(n)
    schedule = build_hbll(tree, inputs=inputs, corrections=1, heads=range(1, n))
    check_updates(schedule, tree, heads=True)
    without = build_hbll(tree, inputs=inputs, corrections=1)
    update = 2 * tree.depth + 2
    assert schedule.critical_path() == without.critical_path() - update + max(update, 4 if n > 1 else 2)


@pytest.mark.parametrize("k", KS)
def test_every_sweep_sets_every_inner_boundary_once(k: int) -> None:
    n = 13
    schedule = build_hbll(midpoint_tree(n), inputs="tree", corrections=k)
    written = Counter(str(v) for t in tasks(schedule) for v in t.writes)
    assert written == Counter(f"h{i}@s{s}" for i in range(1, n) for s in range(k + 1))


def test_parareal_sweep_reads_previous_sweep() -> None:
    tree = Tree.from_splits(4, {(0, 4): 2, (0, 2): 1, (2, 4): 3})
    stages = build_hbll(tree, inputs="tree", corrections=1).stages
    assert [str(t) for t in stages[2]] == ["correct coupler 1: x, h1@s0, x -> h2@s1"]
    assert [str(t) for t in stages[3]] == ["block_forward block 1: x -> h1@s1", "block_forward block 3: h2@s1 -> h3@s1"]
    assert stages[2][0].reads == (Value.h(0), Value.h(1, sweep=0), Value.h(0))


def test_wavefront_pairs_come_from_one_batch() -> None:
    tree = midpoint_tree(4)
    updates = {t.unit: t for t in tasks(build_hbll(tree, inputs="wavefront"))}
    assert texts(updates[Unit.block(1)].reads) == ("x", "y")
    assert texts(updates[Unit.block(3)].reads) == ("h2@prev", "y@lag2")
    assert texts(updates[Unit.block(3)].writes) == ("h3@next",)
    right = tree.node((2, 4)).id
    assert texts(updates[Unit.coupler(right)].reads) == ("h2@lag4", "h4@prev", "y@lag4")
    # a batch's lag: h2@prev entered 2 steps ago, h3@next (written now) 2 steps ago too
    assert [v.lag for v in updates[Unit.block(3)].reads + updates[Unit.block(3)].writes] == [2, 2, 2]


def test_dataflow_bound_is_shorter_than_staged_execution() -> None:
    schedule = build_hbll(midpoint_tree(8), inputs="tree", corrections=0)
    assert schedule.critical_path(dataflow=True) == 8 < schedule.critical_path() == 11


@settings(max_examples=60, deadline=None)
@given(tree=valid_trees(), k=st.integers(0, 2), jacobi=st.booleans(), heads=st.booleans())
def test_any_valid_tree(tree: Tree, k: int, jacobi: bool, heads: bool) -> None:
    L, P = tree.depth, longest_path(tree)
    update = max(2 * P + 2, 4 if heads and tree.n_blocks > 1 else 2)
    with_heads = range(1, tree.n_blocks) if heads else ()
    wave = build_hbll(tree, inputs="wavefront", heads=with_heads)
    assert wave.critical_path() == update
    check_updates(wave, tree, heads)
    correction = "jacobi" if jacobi else "parareal"
    staged = build_hbll(tree, inputs="tree", corrections=k, correction=correction, heads=with_heads)
    sweeps = (k if tree.n_blocks > 1 else 0) if jacobi else k * L
    assert staged.critical_path() == L + sweeps + update
    assert staged.critical_path(dataflow=True) <= staged.critical_path()
    check_updates(staged, tree, heads)
    if not heads:
        assert wave.critical_path() <= 2 * L + 2
        assert jacobi or staged.critical_path() <= (k + 3) * L + 2


@given(n=st.integers(1, 100), k=st.integers(0, 2))
@settings(deadline=None)
def test_midpoint_trees_hit_the_design_formula(n: int, k: int) -> None:
    tree = midpoint_tree(n)
    assert build_hbll(tree, inputs="tree", corrections=k).critical_path() == (k + 3) * tree.depth + 2
    assert build_hbll(tree, inputs="wavefront").critical_path() == 2 * tree.depth + 2


def test_floor_midpoint_tree_has_a_shorter_path() -> None:
    """Split (0, 3] at 1: no block's path has L = 2 couplers, so the step is shorter than DESIGN's bound."""
    tree = Tree.from_splits(3, {(0, 3): 1, (1, 3): 2})
    assert longest_path(tree) == 1
    assert build_hbll(tree, inputs="wavefront").critical_path() == 4 < 2 * 2 + 2


X, Y = Value.batch("x"), Value.batch("y")


def forward(i: int, reads: Value, writes: Value) -> Task:
    return Task(TaskKind.BLOCK_FORWARD, Unit.block(i), (reads,), (writes,))


def one_stage_each(*tasks_: Task) -> Schedule:
    return Schedule("hand", tuple((t,) for t in tasks_), frozenset({X, Y}))


def test_reading_own_stage_is_invalid() -> None:
    first = forward(1, X, Value.h(1))
    second = forward(2, Value.h(1), Value.h(2))
    with pytest.raises(ScheduleError, match="reads"):
        Schedule("hand", ((first, second),), frozenset({X})).validate()


def test_reading_later_stage_is_invalid() -> None:
    early = forward(2, Value.h(1), Value.h(2))
    late = forward(1, X, Value.h(1))
    with pytest.raises(ScheduleError, match="reads"):
        one_stage_each(early, late).validate()
    with pytest.raises(ScheduleError, match="reads"):
        one_stage_each(early, late).critical_path()


def test_a_failed_validation_marks_the_offending_task() -> None:
    early = forward(2, Value.h(1), Value.h(2))
    late = forward(1, X, Value.h(1))
    with pytest.raises(ScheduleError) as info:
        one_stage_each(early, late).validate()
    marked = [line for line in str(info.value).splitlines() if "<-- here" in line]
    assert len(marked) == 1 and "block 2" in marked[0] and "h1 -> h2" in marked[0]


def test_unknown_value_double_write_and_bad_tasks_are_invalid() -> None:
    with pytest.raises(ScheduleError, match="reads"):
        one_stage_each(forward(1, Value("z"), Value.h(1))).validate()
    twice = forward(1, X, Value.h(1))
    with pytest.raises(ScheduleError, match="already written"):
        one_stage_each(twice, twice).validate()
    with pytest.raises(ScheduleError, match="input"):
        one_stage_each(forward(1, X, Y)).validate()
    with pytest.raises(ScheduleError, match="empty"):
        Schedule("hand", ((),), frozenset()).validate()
    with pytest.raises(ScheduleError, match="kind"):
        Task("teleport", Unit.block(1), (), ())  # type: ignore[arg-type]
    with pytest.raises(ScheduleError, match="evals"):
        Task(TaskKind.BLOCK_FORWARD, Unit.block(1), (X,), (Value.h(1),), evals=0)
    with pytest.raises(ScheduleError, match="head"):
        Task(TaskKind.COUPLER_UPDATE, Unit.coupler(0), (X,), (), head=Unit(UnitKind.HEAD, 1))


def test_bad_options_are_rejected() -> None:
    tree = midpoint_tree(4)
    for kwargs in ({"inputs": "oracle"}, {"correction": "newton"}, {"corrections": -1}, {"heads": {0}}):
        with pytest.raises(ValueError):
            build_hbll(tree, **kwargs)
    with pytest.raises(ValueError):
        build_bp(0)


def test_describe_lists_every_task() -> None:
    schedule = build_hbll(midpoint_tree(4), inputs="tree", corrections=1)
    text = schedule.describe()
    assert text.splitlines()[0] == "hbll-tree-parareal-K1: 5 stages, critical path 10"
    assert len(text.splitlines()) == 2 + len(tasks(schedule))
    assert "correct" in text and "h2@s1" in text


def test_only_the_named_blocks_fuse_a_head() -> None:
    tree = midpoint_tree(4)
    fused = {t.unit.id for t in tasks(build_hbll(tree, inputs="wavefront", heads={2})) if t.head is not None}
    assert fused == {2}
    with pytest.raises(ValueError, match="heads must be blocks in 1..3"):
        build_hbll(tree, heads={4})
