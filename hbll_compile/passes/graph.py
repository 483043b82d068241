"""A NetworkX view of a captured graph: which nodes are compute, which are context, and where it may be cut.

Terms (DESIGN §1):
- a node is **stateful** when it depends, through data, on a trainable parameter or on a module with
  parameters or buffers;
- every other computing node is **context**: a parameter-free function of the inputs (masks, position
  ids, the batch size), computed once and handed to every block that reads it;
- the **compute sequence** is the stateful nodes in graph (topological) order; a node of it **owns
  parameters** when it reads an ``nn.Parameter`` or calls a module that has one (the partition gives
  every block at least one such node);
- a **legal cut** after position k of the compute sequence is one where exactly one stateful value,
  and it a tensor, is live across: produced at or before k and read after k;
- a node **normalises** when it is a normalisation layer (LayerNorm, GroupNorm, BatchNorm, RMSNorm,
  ... as a module or an op) or computes one by hand: a product or quotient of a value and a statistic
  (a mean, variance, norm, ...) of that same value, with no layer that has FLOPs between them, as in
  ``x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)``;
- the **head cut** is where the model's output head starts: the last legal cut, or, when the value
  crossing it is a normalisation or a FLOP-free function of one (the final LayerNorm, its ReLU or
  pooling), the last legal cut before that normalisation. Block boundaries fall only at legal cuts up
  to the head cut (``block_cuts``): a coupler cannot stand in for a normalisation (its estimate of
  normalised features is not normalised, and the normalisation's Jacobian, a 1/σ scale and a
  projection, would be missing from every path to the output), so the head always stays in one block
  and runs exactly at the end of every path (measurements: BENCHMARKS.md, issue 12);
- one more rule: a cut never separates a BatchNorm from the layer that feeds it. The raw,
  unnormalised tensor between them is a poor boundary (its scale follows the weights, so couplers
  cannot track it: a CNN cut there stopped learning, BENCHMARKS.md), and the pair is fused at
  deployment anyway.

Example:
    >>> import torch
    >>> from hbll_compile.passes.capture import capture
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> view = build_graph(capture(net, (torch.randn(3, 4),)).gm)
    >>> view.sequence, view.legal_cuts
    (['linear', 'relu', 'linear_1'], [1, 2])
    >>> view.owns_params
    [True, False, True]
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch.fx as fx
from torch import nn

from hbll_compile._util import lookup
from hbll_compile.errors import CutError

__all__ = ["GraphView", "build_graph", "op_name"]


@dataclass
class GraphView:
    """Result of :func:`build_graph`. ``legal_cuts`` holds positions k in 1..len(sequence)-1: the cut
    falls between ``sequence[k-1]`` and ``sequence[k]``; ``crossing[k]`` names the one tensor that crosses.
    ``owns_params[k]`` says whether ``sequence[k]`` owns parameters; ``head_cut`` and ``block_cuts`` are
    defined in the module docstring (``head_cut`` is None when no legal cut precedes the head)."""

    dag: nx.DiGraph
    sequence: list[str]
    context: list[str]
    inputs: list[str]
    output: str
    legal_cuts: list[int]
    crossing: dict[int, str]
    costs: list[int]
    owns_params: list[bool]
    head_cut: int | None
    block_cuts: list[int]


def build_graph(gm: fx.GraphModule, *, assembly: fx.Node | None = None) -> GraphView:
    """Classify the nodes of an annotated graph (see :mod:`.capture`) and find its legal cuts.

    ``assembly``: the model output when it is a stack of *emitted* per-step outputs over time (see
    :func:`~hbll_compile.passes.unroll.emitted_outputs`). It is assembled outside the blocks, so it is
    not in the compute sequence, and its parts, which nothing else reads, are live across no cut.
    """
    dag = nx.DiGraph()
    nodes = list(gm.graph.nodes)
    for n in nodes:
        info = n.meta.get("hbll")
        dag.add_node(n.name, op=n.op, call=op_name(n), cost=info.cost if info else 0,
                     flops=info.flops if info else 0, is_tensor=bool(info and info.is_tensor))
        for a in n.all_input_nodes:
            dag.add_edge(a.name, n.name)

    sources = [n.name for n in nodes if _is_state_source(gm, n)]
    stateful: set[str] = set(sources)
    for s in sources:
        stateful |= nx.descendants(dag, s)
    (output,) = [n for n in nodes if n.op == "output"]
    returned = output.all_input_nodes[0] if output.all_input_nodes else None
    if returned is None or returned.name not in stateful:
        raise CutError(
            "the model output does not depend on any trainable parameter, so there is nothing to train",
            node="output",
            remedy="compile a model whose output is computed from its parameters",
        )

    computing = [n for n in nodes if n.op not in ("placeholder", "output", "get_attr")]
    sequence = [n.name for n in computing if n.name in stateful and n is not assembly]
    context = [n.name for n in computing if n.name not in stateful]
    feeds_batchnorm = {n.name for n in nodes if _only_feeds_batchnorm(gm, n)}
    legal, crossing = _legal_cuts(dag, sequence, stateful, returned.name, feeds_batchnorm)
    by_name = {n.name: n for n in nodes}
    normalisations = {s for s in sequence if _normalises(gm, dag, by_name[s], stateful)}
    head = _head_cut(dag, sequence, legal, crossing, normalisations)
    return GraphView(
        dag=dag,
        sequence=sequence,
        context=context,
        inputs=[n.name for n in nodes if n.op == "placeholder"],
        output=returned.name,
        legal_cuts=legal,
        crossing=crossing,
        costs=[dag.nodes[s]["cost"] for s in sequence],
        owns_params=[_owns_params(gm, by_name[s]) for s in sequence],
        head_cut=head,
        block_cuts=[c for c in legal if head is not None and c <= head],
    )


def _is_state_source(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "get_attr":
        return isinstance(lookup(gm, str(n.target)), nn.Parameter)
    if n.op == "call_module":
        module = gm.get_submodule(str(n.target))
        return any(True for _ in module.parameters()) or any(True for _ in module.buffers())
    return False


def _owns_params(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        return any(True for _ in gm.get_submodule(str(n.target)).parameters())
    return any(a.op == "get_attr" and isinstance(lookup(gm, str(a.target)), nn.Parameter) for a in n.all_input_nodes)


NORMALISATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm,
)
NORMALISATION_OPS = frozenset({
    "layer_norm", "native_layer_norm", "group_norm", "native_group_norm", "batch_norm", "native_batch_norm",
    "_native_batch_norm_legit", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit_functional",
    "instance_norm", "rms_norm", "_fused_rms_norm", "local_response_norm", "normalize",
})
_REDUCTIONS = frozenset({"mean", "var", "std", "sum", "norm", "linalg_vector_norm", "amax", "var_mean", "std_mean"})
_SCALINGS = frozenset({"mul", "div", "truediv"})


def op_name(n: fx.Node) -> str:
    """The bare name of what ``n`` calls: ``"layer_norm"`` for ``aten.layer_norm.default``,
    ``F.layer_norm`` or ``Tensor.layer_norm``; "" for placeholders, attributes and modules."""
    if n.op not in ("call_function", "call_method"):
        return ""
    target = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
    return target.split(".")[0]


def _head_cut(
    dag: nx.DiGraph, sequence: list[str], legal: list[int], crossing: dict[int, str], normalisations: set[str]
) -> int | None:
    if not legal:
        return None
    stateful, value = set(sequence), crossing[legal[-1]]
    while value not in normalisations:  # walk back through FLOP-free ops of one stateful input
        inputs = [p for p in dag.predecessors(value) if p in stateful]
        if dag.nodes[value]["flops"] or len(inputs) != 1:
            return legal[-1]
        (value,) = inputs
    before = [c for c in legal if c <= sequence.index(value)]
    return before[-1] if before else None


def _normalises(gm: fx.GraphModule, dag: nx.DiGraph, n: fx.Node, stateful: set[str]) -> bool:
    if n.op == "call_module":
        return isinstance(gm.get_submodule(str(n.target)), NORMALISATION_MODULES)
    name = op_name(n)
    if name in NORMALISATION_OPS:
        return True
    if name not in _SCALINGS or len(n.all_input_nodes) < 2:
        return False
    # by hand: one operand is a statistic of a stateful value the other operand is computed from
    local = [_local_ancestors(dag, a.name, stateful) for a in n.all_input_nodes]
    for i, statistic in enumerate(local):
        for r in (a for a in statistic if dag.nodes[a]["call"] in _REDUCTIONS):
            sources = set().union(*(_local_ancestors(dag, p, stateful) for p in dag.predecessors(r))) & stateful
            if any(sources & other for j, other in enumerate(local) if j != i):
                return True
    return False


def _local_ancestors(dag: nx.DiGraph, name: str, stateful: set[str]) -> set[str]:
    """``name`` and its ancestors through FLOP-free ops of at most one stateful input, up to (and
    including) the first layer with FLOPs or join of stateful values (a residual sum)."""
    seen, todo = {name}, [name]
    while todo:
        node = todo.pop()
        preds = list(dag.predecessors(node))
        if node != name and (dag.nodes[node]["flops"] or sum(p in stateful for p in preds) > 1):
            continue
        for pred in preds:
            if pred not in seen:
                seen.add(pred)
                todo.append(pred)
    return seen


def _only_feeds_batchnorm(gm: fx.GraphModule, n: fx.Node) -> bool:
    return bool(n.users) and all(
        u.op == "call_module" and isinstance(gm.get_submodule(str(u.target)), nn.modules.batchnorm._BatchNorm)
        for u in n.users
    )


def _legal_cuts(
    dag: nx.DiGraph, sequence: list[str], stateful: set[str], output: str, feeds_batchnorm: set[str]
) -> tuple[list[int], dict[int, str]]:
    """Sweep the compute sequence once, tracking which stateful values are live across each gap."""
    position = {name: i for i, name in enumerate(sequence)}
    end = len(sequence)
    last_use = {}
    for name in sequence:
        readers = [position[s] for s in dag.successors(name) if s in position]
        last_use[name] = end if name == output else max(readers, default=position[name])
    # live across gap k (between k-1 and k) <=> position <= k-1 and last_use >= k
    starts: dict[int, list[str]] = {}
    for name in sequence:
        if last_use[name] > position[name]:
            starts.setdefault(position[name] + 1, []).append(name)
    live: set[str] = set()
    legal: list[int] = []
    crossing: dict[int, str] = {}
    for k in range(1, end):
        live |= set(starts.get(k, ()))
        live = {v for v in live if last_use[v] >= k}
        if len(live) == 1:
            (value,) = live
            if dag.nodes[value]["is_tensor"] and value not in feeds_batchnorm:
                legal.append(k)
                crossing[k] = value
    return legal, crossing
