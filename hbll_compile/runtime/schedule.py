"""Training-step schedules: the data every executor interprets (DESIGN §2).

A :class:`Schedule` is an ordered tuple of stages. A stage is a tuple of :class:`Task` s that do not
depend on one another. Executors run the stages in order and the tasks of one stage in any order or
in parallel. A task names the :class:`Value` s it reads and writes; it never holds tensors.

Task kinds (:class:`TaskKind`). ``reads`` and ``writes`` are positional. Block i is 1-based; v is a tree
node with span (a, b], split s and node id ``v``; ``path`` is the hierarchical path P(. -> N) a loss
goes through.

===============  ==============  ==============================  ================  =================
kind             unit            reads                           writes            evals
===============  ==============  ==============================  ================  =================
BLOCK_FORWARD    block i         (h_{i-1},)                      (h_i,)            1
COUPLER_FORWARD  coupler v       (h_a,)                          (h_b,)            1
CORRECT          coupler v       (new_a, old_{b-1}, old_a)       (new_b,)          1
BLOCK_UPDATE     block i         (h_{i-1}, y)                    () or (h_i@next,) 2 + 2·len(path)
COUPLER_UPDATE   coupler v       (h_a, h_t, y)                   ()                2 + 2·len(path)
HEAD_UPDATE      head i          (h_{i-1}, y)                    ()                4
BP_FORWARD       block i         (h_{i-1},)                      (h_i,)            1
BP_BACKWARD      block i         (h_N, y) or (h_i, g_i)          (g_{i-1},) or ()  1
===============  ==============  ==============================  ================  =================

- ``BLOCK_FORWARD`` / ``COUPLER_FORWARD``: f_i or C_v on a detached input, without grad.
- ``CORRECT``: one Parareal correction, ``new_b = C_v(new_a) + f_b(old_{b-1}) - C_v(old_a)``. The three
  evaluations are independent, so it counts 1. ``C_v(old_a)`` was already computed in the previous sweep;
  an executor may cache it.
- ``BLOCK_UPDATE``: loss ``ℓ(P(i->N)(f_i(h_{i-1})), y)`` through the nodes in ``path``; gradients reach
  f_i only. In wavefront mode it also writes its detached output ``f_i(h_{i-1})`` as ``h{i}@next``.
  When ``task.head`` names a local head (see ``HBLLConfig.local_head_weight``), the head's weighted
  loss ``λ·ℓ(c_i(f_i(h_{i-1})), y)`` joins the update: one block forward, one backward into block and head.
  The head runs beside the path, so the task costs ``max(2 + 2·len(path), 4)``.
- ``COUPLER_UPDATE``: consistency ``‖C_v(h_a) - sg(target)‖²`` plus the task loss
  ``ℓ(P(b->N)(C_v(h_a)), y)`` through ``path``; gradients reach C_v only. In tree mode ``h_t`` is the
  estimate of v's split s and ``target = R(h_t)``, where R is v's right child (its coupler, or block b
  if the child is a leaf): the estimate v's children produce. In wavefront mode ``h_t`` is h_b of the
  same batch and ``target = h_t``.
- ``HEAD_UPDATE`` (DGL): loss ``ℓ(c_i(f_i(h_{i-1})), y)``; gradients reach head c_i and block i (block
  fwd, head fwd, head bwd, block bwd = 4).
- ``BP_FORWARD`` / ``BP_BACKWARD``: end-to-end backprop. ``h{i}`` keeps block i's autograd graph;
  ``g{i}`` is the gradient of the loss with respect to h_i. Block N's backward starts from
  ``ℓ(h_N, y)``.

Values (:class:`Value`; ``str()`` gives the text form used in :meth:`Schedule.describe`):

- ``x``, ``y``: the batch. Boundary 0 is always ``x``.
- ``h{i}@s{k}``: tree-mode estimate of boundary i after sweep k (k = 0 is the estimate, 1..K the
  corrections).
- ``h{i}``, ``g{i}``: exact activations (BP, DGL) and their gradients (BP).
- Wavefront mode (every read is a schedule input, carried over from earlier steps): every value
  belongs to the batch that entered ``value.lag`` steps ago (a ring buffer of recent batches).
  ``h{i}@next`` is what block i writes this step, for the batch that entered i - 1 steps ago; it is
  read as ``h{i}@prev`` on the next step, when that batch entered i steps ago. ``y@lag{k}``,
  ``x@lag{k}`` and ``h{i}@lag{k}`` are the target, input and boundary i of the batch that entered k
  steps ago.

Critical path, with L = ceil(log2 N) and P = max_i len(tree.path(i)) <= L (P = L for power-of-two N
and for trees whose leftmost leaf is at depth L):

- BP: 2N. TBPTT: N + 1. DGL: N + 3 for N >= 2 (N - 1 forward stages, then a head update of 4), 2 for N = 1.
- HBLL tree mode, Parareal: (K+1)·L + 2P + 2, which is DESIGN's (K+3)·L + 2 when P = L.
  Jacobi: L + K + 2P + 2 (each Jacobi sweep is one stage). Wavefront: 2P + 2 (DESIGN's 2L + 2).
- With heads (N >= 2) the update stage costs max(2P + 2, 4).

Example:
    >>> s = build_bp(3)
    >>> len(s), s.critical_path()
    (6, 6)
    >>> str(Value.h(3, carry=Carry.PREV)), Value.h(3, carry=Carry.PREV).lag
    ('h3@prev', 3)
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import networkx as nx

from hbll_compile.ir import Tree, TreeNode

__all__ = [
    "Carry",
    "Schedule",
    "ScheduleError",
    "Stage",
    "Task",
    "TaskKind",
    "Unit",
    "UnitKind",
    "Value",
    "build_bp",
    "build_dgl",
    "build_hbll",
    "build_tbptt",
]


class TaskKind(enum.Enum):
    """The closed set of task kinds; see the module docstring for what each one does."""

    BLOCK_FORWARD = "block_forward"
    COUPLER_FORWARD = "coupler_forward"
    CORRECT = "correct"
    BLOCK_UPDATE = "block_update"
    COUPLER_UPDATE = "coupler_update"
    HEAD_UPDATE = "head_update"
    BP_FORWARD = "bp_forward"
    BP_BACKWARD = "bp_backward"

    def __str__(self) -> str:
        return self.value


class UnitKind(enum.Enum):
    """What a task's unit is: a block (1-based index), a coupler (tree node id) or a local head."""

    BLOCK = "block"
    COUPLER = "coupler"
    HEAD = "head"

    def __str__(self) -> str:
        return self.value


class Unit(NamedTuple):
    """The module a task evaluates or trains.

    Example:
        >>> str(Unit(UnitKind.COUPLER, 4)), Unit.block(2) == Unit(UnitKind.BLOCK, 2)
        ('coupler 4', True)
    """

    kind: UnitKind
    id: int
    """Block index (1-based), tree node id of the coupler, or the head's block index."""

    def __str__(self) -> str:
        return f"{self.kind} {self.id}"

    @classmethod
    def block(cls, i: int) -> Unit:
        return cls(UnitKind.BLOCK, i)

    @classmethod
    def coupler(cls, node: int) -> Unit:
        return cls(UnitKind.COUPLER, node)

    @classmethod
    def head(cls, i: int) -> Unit:
        return cls(UnitKind.HEAD, i)


class Carry(enum.Enum):
    """A wavefront boundary carried between steps: written as ``@next``, read one step later as ``@prev``."""

    PREV = "prev"
    NEXT = "next"


class Value(NamedTuple):
    """A value a task reads or writes.

    ``name`` is ``"x"``, ``"y"``, ``"h"`` or ``"g"``; ``boundary`` the index of ``h``/``g``; ``sweep``
    the tree-mode sweep; ``lag`` the wavefront batch it belongs to (0 = this step's); ``carry`` marks
    wavefront boundaries passed between steps. Build them with :meth:`h`, :meth:`g` and :meth:`batch`.

    Example:
        >>> [str(v) for v in (Value.batch("y", lag=2), Value.h(2, sweep=1), Value.h(0), Value.h(4, carry=Carry.NEXT))]
        ['y@lag2', 'h2@s1', 'x', 'h4@next']
    """

    name: str
    boundary: int | None = None
    sweep: int | None = None
    lag: int = 0
    carry: Carry | None = None

    @property
    def key(self) -> str:
        """The value's name within its batch: ``x``, ``y``, ``h3``, ``g2``."""
        return self.name if self.boundary is None else f"{self.name}{self.boundary}"

    def __str__(self) -> str:
        if self.carry is not None:
            return f"{self.key}@{self.carry.value}"
        if self.sweep is not None:
            return f"{self.key}@s{self.sweep}"
        return f"{self.key}@lag{self.lag}" if self.lag else self.key

    @classmethod
    def batch(cls, name: Literal["x", "y"], *, lag: int = 0) -> Value:
        return cls(name, lag=lag)

    @classmethod
    def h(cls, i: int, *, sweep: int | None = None, lag: int = 0, carry: Carry | None = None) -> Value:
        """Boundary i (``x`` for i = 0). A carried boundary's lag follows from it: ``@prev`` belongs to the
        batch that entered i steps ago, ``@next`` to the one that entered i - 1 steps ago."""
        if i == 0:
            return cls.batch("x", lag=lag)
        if carry is not None:
            lag = i if carry is Carry.PREV else i - 1
        return cls("h", i, sweep, lag, carry)

    @classmethod
    def g(cls, i: int) -> Value:
        return cls("g", i)


_HEAD_EVALS = 4
"""Block forward, head forward, head backward, block backward."""


class ScheduleError(ValueError):
    """A schedule breaks a rule of :meth:`Schedule.validate`; the message shows the offending task."""


@dataclass(frozen=True)
class Task:
    """One unit of work: ``kind`` applied to ``unit``, reading and writing named values.

    Example:
        >>> print(Task(TaskKind.BLOCK_FORWARD, Unit.block(1), (Value.h(0),), (Value.h(1, sweep=0),)))
        block_forward block 1: x -> h1@s0
    """

    kind: TaskKind
    unit: Unit
    reads: tuple[Value, ...]
    writes: tuple[Value, ...]
    evals: int = 1
    """Sequential module evaluations (forwards and backwards) inside the task."""
    path: tuple[int, ...] = ()
    """Tree node ids of the hierarchical path the task's loss goes through, in order."""
    head: Unit | None = None
    """A ``BLOCK_UPDATE``'s fused local head, trained in the same backward."""

    def __post_init__(self) -> None:
        if not isinstance(self.kind, TaskKind):
            raise ScheduleError(f"unknown task kind {self.kind!r}; expected a TaskKind")
        if self.evals < 1:
            raise ScheduleError(f"a task evaluates at least one module, got evals={self.evals}")
        if self.head is not None and self.kind is not TaskKind.BLOCK_UPDATE:
            raise ScheduleError(f"only a block_update fuses a head, not {self.kind}")

    def __str__(self) -> str:
        flow = f"{', '.join(map(str, self.reads)) or '-'} -> {', '.join(map(str, self.writes)) or '-'}"
        return f"{self.kind} {self.unit}: {flow}"


Stage = tuple[Task, ...]
"""Tasks that may run in any order or in parallel."""


@dataclass(frozen=True)
class Schedule:
    """One training step: stages run in order; ``inputs`` are the values available before stage 0.

    Example:
        >>> task = Task(TaskKind.BLOCK_UPDATE, Unit.block(1), (Value.h(0), Value.batch("y")), (), evals=2)
        >>> s = Schedule("one", ((task,),), frozenset({Value.h(0), Value.batch("y")}))
        >>> len(s), s.critical_path()
        (1, 2)
    """

    name: str
    stages: tuple[Stage, ...]
    inputs: frozenset[Value]

    def __len__(self) -> int:
        return len(self.stages)

    def tasks(self) -> list[Task]:
        """Every task, stage by stage."""
        return [task for stage in self.stages for task in stage]

    def validate(self) -> None:
        """Raise :class:`ScheduleError` unless every read is an input or written by a strictly earlier
        stage, no value is written twice, no input is overwritten, and no stage is empty. The message
        shows :meth:`describe` with the offending task marked."""
        available = set(self.inputs)
        for index, stage in enumerate(self.stages):
            if not stage:
                raise ScheduleError(f"stage {index} of {self.name!r} is empty")
            for task in stage:
                missing = [str(r) for r in task.reads if r not in available]
                if missing:
                    self._fail(task, f"stage {index}: {task.kind} {task.unit} reads {missing}, which neither "
                               f"the inputs nor an earlier stage of {self.name!r} provides")
            for task in stage:
                for value in task.writes:
                    if value in available:
                        self._fail(task, f"stage {index}: {task.kind} {task.unit} writes {str(value)!r}, "
                                   "which is an input or already written")
                    available.add(value)

    def _fail(self, task: Task, reason: str) -> None:
        raise ScheduleError(f"{reason}\n{self._table(marked=task)}")

    def critical_path(self, *, dataflow: bool = False) -> int:
        """The longest chain of dependent module evaluations, from the task DAG.

        Nodes are tasks weighted by ``evals``; an edge runs from the task that writes a value to every
        task that reads it. By default every task also waits for the whole previous stage (the stage
        barrier executors honour), so the result is the step's length as executed and matches DESIGN
        §2. ``dataflow=True`` drops the barriers: the bound an asynchronous executor could reach.

        Example:
            >>> build_dgl(4).critical_path(), build_dgl(4).critical_path(dataflow=True)
            (7, 6)
        """
        self.validate()
        graph = nx.DiGraph()
        producer: dict[Value, tuple[str, int, int]] = {}
        for index, stage in enumerate(self.stages):
            barrier = ("barrier", index, 0)
            graph.add_node(barrier, evals=0)
            if index > 0 and not dataflow:
                graph.add_edges_from((("task", index - 1, j), barrier) for j in range(len(self.stages[index - 1])))
            for j, task in enumerate(stage):
                node = ("task", index, j)
                graph.add_node(node, evals=task.evals)
                graph.add_edge(barrier, node)
                graph.add_edges_from((producer[r], node) for r in task.reads if r in producer)
            producer.update({value: ("task", index, j) for j, task in enumerate(stage) for value in task.writes})
        finish: dict[tuple[str, int, int], int] = {}
        for node in nx.topological_sort(graph):
            before = max((finish[p] for p in graph.predecessors(node)), default=0)
            finish[node] = graph.nodes[node]["evals"] + before
        return max(finish.values(), default=0)

    def describe(self) -> str:
        """A readable table: one row per task, grouped by stage.

        Example:
            >>> print(build_bp(1).describe())  # doctest: +NORMALIZE_WHITESPACE
            bp: 2 stages, critical path 2
            stage  kind             unit          evals  reads -> writes
                0  bp_forward       block 1           1  x -> h1
                1  bp_backward      block 1           1  h1, y -> -
        """
        return self._table(critical_path=self.critical_path())

    def _table(self, *, critical_path: int | None = None, marked: Task | None = None) -> str:
        length = f", critical path {critical_path}" if critical_path is not None else ""
        rows = [
            f"{self.name}: {len(self)} stage{'' if len(self) == 1 else 's'}{length}",
            f"{'stage':>5}  {'kind':<16} {'unit':<12} {'evals':>6}  reads -> writes",
        ]
        for index, stage in enumerate(self.stages):
            for j, task in enumerate(stage):
                flow = f"{', '.join(map(str, task.reads)) or '-'} -> {', '.join(map(str, task.writes)) or '-'}"
                via = f"  via nodes {list(task.path)}" if task.path else ""
                head = f"  + {task.head}" if task.head else ""
                mark = "  <-- here" if task is marked else ""
                rows.append(f"{index if j == 0 else '':>5}  {task.kind.value:<16} {str(task.unit):<12} "
                            f"{task.evals:>6}  {flow}{via}{head}{mark}")
        return "\n".join(rows)


_X, _Y = Value.batch("x"), Value.batch("y")


def build_bp(n_blocks: int) -> Schedule:
    """End-to-end backprop: N forward stages, then N backward stages. Critical path 2N.

    Example:
        >>> build_bp(4).critical_path()
        8
    """
    _check_blocks(n_blocks)
    forward = [(Task(TaskKind.BP_FORWARD, Unit.block(i), (Value.h(i - 1),), (Value.h(i),)),)
               for i in range(1, n_blocks + 1)]
    backward = [
        (
            Task(
                TaskKind.BP_BACKWARD,
                Unit.block(i),
                (Value.h(i), _Y if i == n_blocks else Value.g(i)),
                (Value.g(i - 1),) if i > 1 else (),
            ),
        )
        for i in range(n_blocks, 0, -1)
    ]
    return _validated("bp", forward + backward, frozenset({_X, _Y}))


def build_dgl(n_blocks: int) -> Schedule:
    """Decoupled greedy learning: a detached forward chain, then every block trained by its local head.

    Blocks 1..N-1 run forward one stage each (block N's output is not needed). The last stage holds a
    ``HEAD_UPDATE`` for each block i < N on ``h{i-1}`` (4 evaluations) and block N's plain
    ``BLOCK_UPDATE`` (2). Critical path N + 3 for N >= 2, and 2 for N = 1.

    Example:
        >>> len(build_dgl(4)), build_dgl(4).critical_path()
        (4, 7)
    """
    forward, last = _detached_chain(n_blocks)
    heads = [Task(TaskKind.HEAD_UPDATE, Unit.head(i), (Value.h(i - 1), _Y), (), evals=_HEAD_EVALS)
             for i in range(1, n_blocks)]
    return _validated("dgl", [*forward, (*heads, last)], frozenset({_X, _Y}))


def build_tbptt(n_blocks: int, *, emits: bool = False) -> Schedule:
    """Truncated backprop through time over N chunks of time steps (``over="time"``): each chunk learns only
    from the outputs it emits itself, on its detached initial state. With a last-step readout only the
    last chunk emits one: a detached forward chain through chunks 1..N-1, then chunk N trained by the task
    loss of its output, and the earlier chunks get no gradient (that is the baseline's point). With
    ``emits`` (every chunk emits outputs) chunk i's update runs on the state chunk i-1's update wrote.
    Critical path N + 1, or 2N with ``emits``.

    Example:
        >>> len(build_tbptt(4)), build_tbptt(4).critical_path(), build_tbptt(4, emits=True).critical_path()
        (4, 5, 8)
    """
    if emits:
        _check_blocks(n_blocks)
        stages = [(Task(TaskKind.BLOCK_UPDATE, Unit.block(i), (Value.h(i - 1), _Y),
                        (Value.h(i),) if i < n_blocks else (), evals=2),) for i in range(1, n_blocks + 1)]
        return _validated("tbptt", stages, frozenset({_X, _Y}))
    forward, last = _detached_chain(n_blocks)
    return _validated("tbptt", [*forward, (last,)], frozenset({_X, _Y}))


def _detached_chain(n_blocks: int) -> tuple[list[Stage], Task]:
    """What DGL and truncated BPTT share: blocks 1..N-1 forward without grad, one stage each, and block
    N's update on the task loss of its output."""
    _check_blocks(n_blocks)
    forward: list[Stage] = [(Task(TaskKind.BLOCK_FORWARD, Unit.block(i), (Value.h(i - 1),), (Value.h(i),)),)
                            for i in range(1, n_blocks)]
    return forward, Task(TaskKind.BLOCK_UPDATE, Unit.block(n_blocks), (Value.h(n_blocks - 1), _Y), (), evals=2)


def build_hbll(
    tree: Tree,
    *,
    inputs: Literal["tree", "wavefront"] = "wavefront",
    corrections: int = 2,
    correction: Literal["parareal", "jacobi"] = "parareal",
    heads: Collection[int] = (),
) -> Schedule:
    """The HBLL step over ``tree`` (DESIGN §2). Defaults follow :class:`~hbll_compile.config.HBLLConfig`.

    ``inputs="tree"``: L estimate stages, ``corrections`` sweeps (L stages each for Parareal, one for
    Jacobi), then one local-update stage. ``inputs="wavefront"``: only the local-update stage, on values
    carried over from earlier steps; ``corrections`` and ``correction`` are ignored. Blocks i in
    ``heads`` (1..N-1) fuse their local head into their update.

    Example:
        >>> t = Tree.from_splits(4, {(0, 4): 2, (0, 2): 1, (2, 4): 3})
        >>> build_hbll(t, inputs="tree", corrections=2).critical_path()
        12
        >>> build_hbll(t, inputs="wavefront").critical_path()
        6
    """
    if inputs not in ("tree", "wavefront"):
        raise ValueError(f"inputs must be 'tree' or 'wavefront', got {inputs!r}")
    if correction not in ("parareal", "jacobi"):
        raise ValueError(f"correction must be 'parareal' or 'jacobi', got {correction!r}")
    if corrections < 0:
        raise ValueError(f"corrections must be >= 0, got {corrections}")
    if not set(heads) <= set(range(1, tree.n_blocks)):
        raise ValueError(f"heads must be blocks in 1..{tree.n_blocks - 1}, got {sorted(heads)}")
    heads = frozenset(heads)
    if inputs == "wavefront":
        return _validated("hbll-wavefront", [_wavefront_updates(tree, heads)], None)
    stages = _estimate_sweep(tree, 0)
    for k in range(1, corrections + 1):
        stages += _jacobi_sweep(tree, k) if correction == "jacobi" else _estimate_sweep(tree, k)
    stages.append(_tree_updates(tree, corrections, heads))
    return _validated(f"hbll-tree-{correction}-K{corrections}", stages, frozenset({_X, _Y}))


def _estimate_sweep(tree: Tree, k: int) -> list[Stage]:
    """Sweep k over boundaries 1..N-1, top-down in L stages.

    In stage d every internal node at depth d sets its split boundary through its left child, from the
    left end, which a shallower stage (or ``x``) already provides. Sweep 0 is the estimate; later
    sweeps apply the Parareal correction (a leaf child is its block, run on this sweep's input).
    """
    stages = []
    for level in tree.levels()[: tree.depth]:
        stages.append(tuple(_set_right_end(tree.nodes[u.children[0]], k) for u in level if not u.is_leaf))
    return stages


def _set_right_end(child: TreeNode, k: int) -> Task:
    a, b = child.span
    if child.is_leaf:
        return Task(TaskKind.BLOCK_FORWARD, Unit.block(b), (_estimate(a, k),), (_estimate(b, k),))
    if k == 0:
        return Task(TaskKind.COUPLER_FORWARD, Unit.coupler(child.id), (_estimate(a, 0),), (_estimate(b, 0),))
    reads = (_estimate(a, k), _estimate(b - 1, k - 1), _estimate(a, k - 1))
    return Task(TaskKind.CORRECT, Unit.coupler(child.id), reads, (_estimate(b, k),))


def _jacobi_sweep(tree: Tree, k: int) -> list[Stage]:
    """Every boundary 1..N-1 at once: ``h_i <- f_i(h_{i-1})`` on sweep k-1 (no stage when N = 1)."""
    stage = tuple(
        Task(TaskKind.BLOCK_FORWARD, Unit.block(i), (_estimate(i - 1, k - 1),), (_estimate(i, k),))
        for i in range(1, tree.n_blocks)
    )
    return [stage] if stage else []


def _tree_updates(tree: Tree, sweep: int, heads: frozenset[int]) -> Stage:
    n = tree.n_blocks
    blocks = [_block_update(tree, i, (_estimate(i - 1, sweep), _Y), (), heads) for i in range(1, n + 1)]
    couplers = [
        _coupler_update(tree, v, (_estimate(v.span[0], sweep), _estimate(_split(tree, v), sweep), _Y))
        for v in tree.internal_nodes
    ]
    return (*blocks, *couplers)


def _wavefront_updates(tree: Tree, heads: frozenset[int]) -> Stage:
    n = tree.n_blocks

    def block_reads(i: int) -> tuple[Value, Value]:
        return (Value.h(i - 1, carry=Carry.PREV) if i > 1 else _X, Value.batch("y", lag=i - 1))

    blocks = [_block_update(tree, i, block_reads(i), (Value.h(i, carry=Carry.NEXT),), heads)
              for i in range(1, n + 1)]
    couplers = []
    for v in tree.internal_nodes:
        a, b = v.span
        pair = (Value.h(a, lag=b), Value.h(b, carry=Carry.PREV))
        couplers.append(_coupler_update(tree, v, (*pair, Value.batch("y", lag=b))))
    return (*blocks, *couplers)


def _block_update(
    tree: Tree, i: int, reads: tuple[Value, ...], writes: tuple[Value, ...], heads: frozenset[int]
) -> Task:
    path = tuple(node.id for node in tree.path(i))
    head = Unit.head(i) if i in heads else None
    evals = max(2 + 2 * len(path), _HEAD_EVALS if head else 0)
    return Task(TaskKind.BLOCK_UPDATE, Unit.block(i), reads, writes, evals=evals, path=path, head=head)


def _coupler_update(tree: Tree, v: TreeNode, reads: tuple[Value, ...]) -> Task:
    path = tuple(node.id for node in tree.path(v.span[1]))
    return Task(TaskKind.COUPLER_UPDATE, Unit.coupler(v.id), reads, (), evals=2 + 2 * len(path), path=path)


def _split(tree: Tree, v: TreeNode) -> int:
    return tree.nodes[v.children[0]].span[1]


def _estimate(i: int, sweep: int) -> Value:
    return Value.h(i, sweep=sweep)


def _check_blocks(n_blocks: int) -> None:
    if n_blocks < 1:
        raise ValueError(f"a schedule needs at least one block, got {n_blocks}")


def _validated(name: str, stages: Sequence[Stage], inputs: frozenset[Value] | None) -> Schedule:
    """Build and validate a schedule; ``inputs=None`` makes every read an input (wavefront mode)."""
    if inputs is None:
        inputs = frozenset(r for stage in stages for task in stage for r in task.reads)
    schedule = Schedule(name, tuple(stages), inputs)
    schedule.validate()
    return schedule
