"""A NetworkX view of a captured graph: which nodes are compute, which are context, and where it may be cut.

Terms (DESIGN §1):
- a node is **stateful** when it depends, through data, on a trainable parameter or on a module with
  parameters or buffers;
- every other computing node is **context**: a parameter-free function of the inputs (masks, position
  ids, the batch size), computed once and handed to every block that reads it;
- the **compute sequence** is the stateful nodes in graph (topological) order;
- a **legal cut** after position k of the compute sequence is one where exactly one stateful value,
  and it a tensor, is live across: produced at or before k and read after k;
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
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch.fx as fx
from torch import nn

from hbll_compile._util import lookup
from hbll_compile.errors import CutError


@dataclass
class GraphView:
    """Result of :func:`build_graph`. ``legal_cuts`` holds positions k in 1..len(sequence)-1: the cut
    falls between ``sequence[k-1]`` and ``sequence[k]``; ``crossing[k]`` names the one tensor that crosses."""

    dag: nx.DiGraph
    sequence: list[str]
    context: list[str]
    inputs: list[str]
    output: str
    legal_cuts: list[int]
    crossing: dict[int, str]
    costs: list[int]


def build_graph(gm: fx.GraphModule) -> GraphView:
    """Classify the nodes of an annotated graph (see :mod:`.capture`) and find its legal cuts."""
    dag = nx.DiGraph()
    nodes = list(gm.graph.nodes)
    for n in nodes:
        info = n.meta.get("hbll")
        dag.add_node(n.name, op=n.op, cost=info.cost if info else 0, is_tensor=bool(info and info.is_tensor))
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
    sequence = [n.name for n in computing if n.name in stateful]
    context = [n.name for n in computing if n.name not in stateful]
    feeds_batchnorm = {n.name for n in nodes if _only_feeds_batchnorm(gm, n)}
    legal, crossing = _legal_cuts(dag, sequence, stateful, returned.name, feeds_batchnorm)
    for name, value in (("sequence", sequence), ("context", context)):
        for i, node_name in enumerate(value):
            dag.nodes[node_name]["role"] = name
            dag.nodes[node_name]["position"] = i
    return GraphView(
        dag=dag,
        sequence=sequence,
        context=context,
        inputs=[n.name for n in nodes if n.op == "placeholder"],
        output=returned.name,
        legal_cuts=legal,
        crossing=crossing,
        costs=[dag.nodes[s]["cost"] for s in sequence],
    )


def _is_state_source(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "get_attr":
        return isinstance(lookup(gm, n.target), nn.Parameter)
    if n.op == "call_module":
        module = gm.get_submodule(n.target)
        return any(True for _ in module.parameters()) or any(True for _ in module.buffers())
    return False


def _only_feeds_batchnorm(gm: fx.GraphModule, n: fx.Node) -> bool:
    return bool(n.users) and all(
        u.op == "call_module" and isinstance(gm.get_submodule(u.target), nn.modules.batchnorm._BatchNorm)
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
