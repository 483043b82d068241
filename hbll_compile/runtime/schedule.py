"""Training-step schedules: the data every executor interprets (DESIGN §2).

A :class:`Schedule` is an ordered tuple of stages. A stage is a tuple of :class:`Task` s that do not
depend on one another. Executors run the stages in order and the tasks of one stage in any order or
in parallel. A task names the values it reads and writes; it never holds tensors.

Task kinds. ``reads`` and ``writes`` are positional. Block i is 1-based; v is a tree node with span
(a, b], split s and node id ``v``; ``path`` is the hierarchical path P(. -> N) a loss goes through.

=================  ===============  ==============================  ================  =================
kind               unit             reads                           writes            evals
=================  ===============  ==============================  ================  =================
block_forward      ("block", i)     (h_{i-1},)                      (h_i,)            1
coupler_forward    ("coupler", v)   (h_a,)                          (h_b,)            1
correct            ("coupler", v)   (new_a, old_{b-1}, old_a)       (new_b,)          1
block_update       ("block", i)     (h_{i-1}, y)                    () or (h_i@next,) 2 + 2·len(path)
coupler_update     ("coupler", v)   (h_a, h_t, y)                   ()                2 + 2·len(path)
head_update        ("head", i)      (h_{i-1}, y)                    ()                4
bp_forward         ("block", i)     (h_{i-1},)                      (h_i,)            1
bp_backward        ("block", i)     (h_N, y) or (h_i, g_i)          (g_{i-1},) or ()  1
=================  ===============  ==============================  ================  =================

- ``block_forward`` / ``coupler_forward``: f_i or C_v on a detached input, without grad.
- ``correct``: one Parareal correction, ``new_b = C_v(new_a) + f_b(old_{b-1}) - C_v(old_a)``. The three
  evaluations are independent, so it counts 1. ``C_v(old_a)`` was already computed in the previous sweep;
  an executor may cache it.
- ``block_update``: loss ``ℓ(P(i->N)(f_i(h_{i-1})), y)`` through the nodes in ``path``; gradients reach
  f_i only. In wavefront mode it also writes its detached output ``f_i(h_{i-1})`` as ``h{i}@next``.
- ``coupler_update``: consistency ``‖C_v(h_a) - sg(target)‖²`` plus the task loss
  ``ℓ(P(b->N)(C_v(h_a)), y)`` through ``path``; gradients reach C_v only. In tree mode ``h_t`` is the
  estimate of v's split s and ``target = R(h_t)``, where R is v's right child (its coupler, or block b
  if the child is a leaf): the estimate v's children produce. In wavefront mode ``h_t`` is h_b of the
  same batch and ``target = h_t``.
- ``head_update``: loss ``ℓ(c_i(f_i(h_{i-1})), y)``, weighted by λ under HBLL; gradients reach head
  c_i and block i (block fwd, head fwd, head bwd, block bwd = 4). It reads what ``block_update`` i
  reads, so an executor may fuse the two.
- ``bp_forward`` / ``bp_backward``: end-to-end backprop. ``h{i}`` keeps block i's autograd graph;
  ``g{i}`` is the gradient of the loss with respect to h_i. Block N's backward starts from
  ``ℓ(h_N, y)``.

Value names:

- ``x``, ``y``: the batch. Boundary 0 is always ``x``.
- ``h{i}@s{k}``: tree-mode estimate of boundary i after sweep k (k = 0 is the estimate, 1..K the
  corrections).
- ``h{i}``, ``g{i}``: exact activations (BP, DGL) and their gradients (BP).
- Wavefront mode (every read is a schedule input, carried over from earlier steps):
  ``h{i}@next`` is what block i writes this step; it becomes ``h{i}@prev`` on the next step.
  ``h{i}@prev`` belongs to the batch that entered i steps ago. ``y@lag{k}``, ``x@lag{k}`` and
  ``h{i}@lag{k}`` are the target, input and boundary i of the batch that entered k steps ago
  (a ring buffer; ``h{i}@lag{k}`` was written as ``h{i}@next`` k - i + 1 steps ago).

Critical path, with L = ceil(log2 N) and P = max_i len(tree.path(i)) <= L (P = L for power-of-two N
and for trees whose leftmost leaf is at depth L):

- BP: 2N. DGL: N + 3 for N >= 2 (N - 1 forward stages, then a head update of 4), 2 for N = 1.
- HBLL tree mode, Parareal: (K+1)·L + 2P + 2, which is DESIGN's (K+3)·L + 2 when P = L.
  Jacobi: L + K + 2P + 2 (each Jacobi sweep is one stage). Wavefront: 2P + 2 (DESIGN's 2L + 2).
- With heads (N >= 2) the update stage costs max(2P + 2, 4).

Example:
    >>> s = build_bp(3)
    >>> len(s), s.critical_path()
    (6, 6)
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx

from hbll_compile.ir import Tree, TreeNode

KINDS = frozenset(
    {
        "block_forward",
        "coupler_forward",
        "correct",
        "block_update",
        "coupler_update",
        "head_update",
        "bp_forward",
        "bp_backward",
    }
)
"""The closed set of task kinds; see the module docstring for what each one does."""

_HEAD_EVALS = 4
"""Block forward, head forward, head backward, block backward."""


@dataclass(frozen=True)
class Task:
    """One unit of work: ``kind`` applied to ``unit``, reading and writing named values.

    Example:
        >>> Task("block_forward", ("block", 1), ("x",), ("h1@s0",))
        Task(kind='block_forward', unit=('block', 1), reads=('x',), writes=('h1@s0',), evals=1, path=())
    """

    kind: str
    unit: tuple[str, int]
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    evals: int = 1
    """Sequential module evaluations (forwards and backwards) inside the task."""
    path: tuple[int, ...] = ()
    """Tree node ids of the hierarchical path the task's loss goes through, in order."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown task kind {self.kind!r}; expected one of {sorted(KINDS)}")
        if self.evals < 1:
            raise ValueError(f"a task evaluates at least one module, got evals={self.evals}")


Stage = tuple[Task, ...]
"""Tasks that may run in any order or in parallel."""


@dataclass(frozen=True)
class Schedule:
    """One training step: stages run in order; ``inputs`` are the values available before stage 0.

    Example:
        >>> s = Schedule("one", ((Task("block_update", ("block", 1), ("x", "y"), (), evals=2),),),
        ...              frozenset({"x", "y"}))
        >>> len(s), s.critical_path()
        (1, 2)
    """

    name: str
    stages: tuple[Stage, ...]
    inputs: frozenset[str]

    def __len__(self) -> int:
        return len(self.stages)

    def validate(self) -> None:
        """Raise ValueError unless every read is an input or written by a strictly earlier stage,
        no value is written twice, no input is overwritten, and no stage is empty."""
        available = set(self.inputs)
        for index, stage in enumerate(self.stages):
            if not stage:
                raise ValueError(f"stage {index} of {self.name!r} is empty")
            for task in stage:
                missing = [r for r in task.reads if r not in available]
                if missing:
                    raise ValueError(
                        f"stage {index}: {task.kind} {task.unit} reads {missing}, which neither the "
                        f"inputs nor an earlier stage of {self.name!r} provides"
                    )
            for task in stage:
                for value in task.writes:
                    if value in available:
                        raise ValueError(
                            f"stage {index}: {task.kind} {task.unit} writes {value!r}, "
                            "which is an input or already written"
                        )
                    available.add(value)

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
        producer: dict[str, tuple] = {}
        for index, stage in enumerate(self.stages):
            barrier = ("barrier", index)
            graph.add_node(barrier, evals=0)
            if index > 0 and not dataflow:
                graph.add_edges_from((("task", index - 1, j), barrier) for j in range(len(self.stages[index - 1])))
            for j, task in enumerate(stage):
                node = ("task", index, j)
                graph.add_node(node, evals=task.evals)
                graph.add_edge(barrier, node)
                graph.add_edges_from((producer[r], node) for r in task.reads if r in producer)
            producer.update({value: ("task", index, j) for j, task in enumerate(stage) for value in task.writes})
        finish: dict[tuple, int] = {}
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
        rows = [
            f"{self.name}: {len(self)} stage{'' if len(self) == 1 else 's'}, critical path {self.critical_path()}",
            f"{'stage':>5}  {'kind':<16} {'unit':<12} {'evals':>6}  reads -> writes",
        ]
        for index, stage in enumerate(self.stages):
            for j, task in enumerate(stage):
                unit = f"{task.unit[0]} {task.unit[1]}"
                flow = f"{', '.join(task.reads) or '-'} -> {', '.join(task.writes) or '-'}"
                via = f"  via nodes {list(task.path)}" if task.path else ""
                rows.append(f"{index if j == 0 else '':>5}  {task.kind:<16} {unit:<12} {task.evals:>6}  {flow}{via}")
        return "\n".join(rows)


def build_bp(n_blocks: int) -> Schedule:
    """End-to-end backprop: N forward stages, then N backward stages. Critical path 2N.

    Example:
        >>> build_bp(4).critical_path()
        8
    """
    _check_blocks(n_blocks)
    forward = [(Task("bp_forward", ("block", i), (_exact(i - 1),), (f"h{i}",)),) for i in range(1, n_blocks + 1)]
    backward = [
        (
            Task(
                "bp_backward",
                ("block", i),
                (f"h{i}", "y" if i == n_blocks else f"g{i}"),
                (f"g{i - 1}",) if i > 1 else (),
            ),
        )
        for i in range(n_blocks, 0, -1)
    ]
    return _validated("bp", forward + backward, frozenset({"x", "y"}))


def build_dgl(n_blocks: int) -> Schedule:
    """Decoupled greedy learning: a detached forward chain, then every block trained by its local head.

    Blocks 1..N-1 run forward one stage each (block N's output is not needed). The last stage holds a
    ``head_update`` for each block i < N on ``h{i-1}`` (4 evaluations) and block N's plain
    ``block_update`` (2). Critical path N + 3 for N >= 2, and 2 for N = 1.

    Example:
        >>> len(build_dgl(4)), build_dgl(4).critical_path()
        (4, 7)
    """
    _check_blocks(n_blocks)
    forward = [(Task("block_forward", ("block", i), (_exact(i - 1),), (f"h{i}",)),) for i in range(1, n_blocks)]
    heads = [_head_update(i, (_exact(i - 1), "y")) for i in range(1, n_blocks)]
    last = Task("block_update", ("block", n_blocks), (_exact(n_blocks - 1), "y"), (), evals=2)
    return _validated("dgl", [*forward, (*heads, last)], frozenset({"x", "y"}))


def build_hbll(
    tree: Tree,
    *,
    inputs: str = "wavefront",
    corrections: int = 2,
    correction: str = "parareal",
    head_weight: float = 0.0,
) -> Schedule:
    """The HBLL step over ``tree`` (DESIGN §2). Defaults follow :class:`~hbll_compile.config.HBLLConfig`.

    ``inputs="tree"``: L estimate stages, ``corrections`` sweeps (L stages each for Parareal, one for
    Jacobi), then one local-update stage. ``inputs="wavefront"``: only the local-update stage, on values
    carried over from earlier steps; ``corrections`` and ``correction`` are ignored. Head updates for
    blocks 1..N-1 are added when ``head_weight > 0``.

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
    if head_weight < 0:
        raise ValueError(f"head_weight must be >= 0, got {head_weight}")
    if inputs == "wavefront":
        return _validated("hbll-wavefront", [_wavefront_updates(tree, head_weight > 0)], None)
    stages = _estimate_sweep(tree, 0)
    for k in range(1, corrections + 1):
        stages += _jacobi_sweep(tree, k) if correction == "jacobi" else _estimate_sweep(tree, k)
    stages.append(_tree_updates(tree, corrections, head_weight > 0))
    return _validated(f"hbll-tree-{correction}-K{corrections}", stages, frozenset({"x", "y"}))


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
        return Task("block_forward", ("block", b), (_estimate(a, k),), (_estimate(b, k),))
    if k == 0:
        return Task("coupler_forward", ("coupler", child.id), (_estimate(a, 0),), (_estimate(b, 0),))
    reads = (_estimate(a, k), _estimate(b - 1, k - 1), _estimate(a, k - 1))
    return Task("correct", ("coupler", child.id), reads, (_estimate(b, k),))


def _jacobi_sweep(tree: Tree, k: int) -> list[Stage]:
    """Every boundary 1..N-1 at once: ``h_i <- f_i(h_{i-1})`` on sweep k-1 (no stage when N = 1)."""
    stage = tuple(
        Task("block_forward", ("block", i), (_estimate(i - 1, k - 1),), (_estimate(i, k),))
        for i in range(1, tree.n_blocks)
    )
    return [stage] if stage else []


def _tree_updates(tree: Tree, sweep: int, heads: bool) -> Stage:
    n = tree.n_blocks
    blocks = [_block_update(tree, i, (_estimate(i - 1, sweep), "y"), ()) for i in range(1, n + 1)]
    couplers = [
        _coupler_update(tree, v, (_estimate(v.span[0], sweep), _estimate(_split(tree, v), sweep), "y"))
        for v in tree.internal_nodes
    ]
    head_tasks = [_head_update(i, (_estimate(i - 1, sweep), "y")) for i in range(1, n) if heads]
    return (*blocks, *couplers, *head_tasks)


def _wavefront_updates(tree: Tree, heads: bool) -> Stage:
    n = tree.n_blocks

    def block_reads(i: int) -> tuple[str, str]:
        return ("x" if i == 1 else f"h{i - 1}@prev", _lagged("y", i - 1))

    blocks = [_block_update(tree, i, block_reads(i), (f"h{i}@next",)) for i in range(1, n + 1)]
    couplers = []
    for v in tree.internal_nodes:
        a, b = v.span
        pair = (_lagged("x" if a == 0 else f"h{a}", b), f"h{b}@prev")
        couplers.append(_coupler_update(tree, v, (*pair, _lagged("y", b))))
    head_tasks = [_head_update(i, block_reads(i)) for i in range(1, n) if heads]
    return (*blocks, *couplers, *head_tasks)


def _block_update(tree: Tree, i: int, reads: tuple[str, ...], writes: tuple[str, ...]) -> Task:
    path = tuple(node.id for node in tree.path(i))
    return Task("block_update", ("block", i), reads, writes, evals=2 + 2 * len(path), path=path)


def _coupler_update(tree: Tree, v: TreeNode, reads: tuple[str, ...]) -> Task:
    path = tuple(node.id for node in tree.path(v.span[1]))
    return Task("coupler_update", ("coupler", v.id), reads, (), evals=2 + 2 * len(path), path=path)


def _head_update(i: int, reads: tuple[str, ...]) -> Task:
    return Task("head_update", ("head", i), reads, (), evals=_HEAD_EVALS)


def _split(tree: Tree, v: TreeNode) -> int:
    return tree.nodes[v.children[0]].span[1]


def _estimate(i: int, sweep: int) -> str:
    return "x" if i == 0 else f"h{i}@s{sweep}"


def _exact(i: int) -> str:
    return "x" if i == 0 else f"h{i}"


def _lagged(name: str, k: int) -> str:
    return name if k == 0 else f"{name}@lag{k}"


def _check_blocks(n_blocks: int) -> None:
    if n_blocks < 1:
        raise ValueError(f"a schedule needs at least one block, got {n_blocks}")


def _validated(name: str, stages: list[Stage], inputs: frozenset[str] | None) -> Schedule:
    """Build and validate a schedule; ``inputs=None`` makes every read an input (wavefront mode)."""
    if inputs is None:
        inputs = frozenset(r for stage in stages for task in stage for r in task.reads)
    schedule = Schedule(name, tuple(stages), inputs)
    schedule.validate()
    return schedule


def value_source(name: str) -> tuple[str, int]:
    """Where a wavefront value lives: ``(key, lag)`` in the ring of recent batches (lag 0 = this batch).

    ``h{i}@prev`` is boundary i of the batch that entered i steps ago; ``name@lag{k}`` is ``name`` of the
    batch that entered k steps ago; a bare name belongs to this step's batch; ``h{i}@next`` is written
    for the batch block i processes now, which entered i - 1 steps ago.

    Example:
        >>> value_source("h3@prev"), value_source("y@lag2"), value_source("h2@next"), value_source("x")
        (('h3', 3), ('y', 2), ('h2', 1), ('x', 0))
    """
    key, _, tag = name.partition("@")
    if tag == "prev":
        return key, int(key[1:])
    if tag == "next":
        return key, int(key[1:]) - 1
    if tag.startswith("lag"):
        return key, int(tag[3:])
    if tag:
        raise ValueError(f"{name!r} is not a wavefront value name")
    return key, 0
