"""Lowering: split the captured graph into a context GraphModule and N block GraphModules.

Calling convention (read by the runtime, never re-derived):
- ``tail(t, *[env[name] for name in tail.spec.context])`` runs the model's output tail (the end of
  block N chosen by :func:`tail_cut`, see :class:`~hbll_compile.ir.Tail`) on the value ``t`` crossing
  its cut;
- ``context(*inputs)`` returns the tuple of context values named ``Lowered.context_names``;
- the *environment* of one forward is ``{input name: input} | {context name: value}``;
- block i is called as ``blocks[i-1](h_{i-1}, *[env[name] for name in specs[i-1].context])``, where
  ``h_0`` is the first model input; it returns ``h_i`` (``h_N`` is the model output), or, for a model
  with an :class:`~hbll_compile.ir.Emission`, the pair ``(h_i, e_i)`` of its final state and its steps'
  outputs (the model output is then the concatenation of every ``e_i``).

Blocks own no state. Each ``get_attr`` target is bound by :func:`bind_state` to the user's own tensor
(or to a captured constant), and each ``call_module`` target is the user's own module object, so
parameters and buffers are shared and tied weights stay tied.

Example:
    >>> import torch
    >>> from hbll_compile.passes.capture import capture
    >>> from hbll_compile.passes.graph import build_graph
    >>> from hbll_compile.passes.partition import choose_cuts
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> cap = capture(net, (torch.randn(3, 4),)); view = build_graph(cap.gm)
    >>> low = lower(cap, view, choose_cuts(view.costs, view.block_cuts, 2, view.owns_params), net)
    >>> [b.index for b in low.boundaries], len(low.blocks)
    ([0, 1, 2], 2)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
import torch.fx as fx
from torch import nn

from hbll_compile._util import assign, lookup
from hbll_compile.errors import LoweringError
from hbll_compile.ir import BlockSpec, Boundary, Emission, Tail
from hbll_compile.passes.capture import Captured, example_batch
from hbll_compile.passes.graph import GraphView
from hbll_compile.passes.partition import Partition

__all__ = ["Lowered", "bind_state", "lower", "tail_cut"]


@dataclass
class Lowered:
    context: fx.GraphModule
    context_names: tuple[str, ...]
    input_names: tuple[str, ...]
    blocks: list[fx.GraphModule]
    specs: list[BlockSpec]
    boundaries: list[Boundary]
    constants: dict[str, torch.Tensor]
    """Captured tensors that are not attributes of the user's model (``target -> tensor``)."""
    tail: fx.GraphModule
    """The end of block N from :func:`tail_cut` on (``blocks[-1]`` itself when that is None)."""
    tail_info: Tail
    emission: Emission | None = None


def lower(
    captured: Captured, view: GraphView, partition: Partition, model: nn.Module, *, output_tail: str = "auto",
    final_cut: int | None = None,
) -> Lowered:
    """Build the context and block GraphModules for ``partition`` (see the module docstring); the
    tail follows :func:`tail_cut`. ``final_cut``: for a model that emits per-step outputs (``view.output``
    stacks them), the cut after the last step's state
    (:func:`~hbll_compile.passes.unroll.final_state_cut`), where the step readout starts."""
    gm = captured.gm
    nodes = {n.name: n for n in gm.graph.nodes}
    input_names = tuple(view.inputs)
    bounds = [0, *partition.cuts, len(view.sequence)]
    last = view.output if final_cut is None else view.crossing[final_cut]
    boundary_nodes = [input_names[0], *(view.crossing[c] for c in partition.cuts), last]
    parts, dim = _emitted(nodes[view.output]) if final_cut is not None else ((), 0)

    block_graphs, reads, steps = [], [], []
    for i in range(len(bounds) - 1):
        members = view.sequence[bounds[i]:bounds[i + 1]]
        emits = [p for p in parts if p in set(members)]
        graph, context_reads = _block_graph(nodes, members, boundary_nodes[i], boundary_nodes[i + 1], emits, dim)
        block_graphs.append(graph)
        reads.append(context_reads)
        steps.append(len(emits))
    needed = {name for r in reads for name in r}
    context_names = tuple(n for n in view.context if n in needed)
    context_graph = _context_graph(nodes, view.inputs, view.context, context_names)

    constants: dict[str, torch.Tensor] = {}
    resolve = _resolver(model, gm, constants)
    context = _graph_module(gm, context_graph, resolve, "Context")
    blocks = [_graph_module(gm, g, resolve, f"Block{i + 1}") for i, g in enumerate(block_graphs)]

    batch = example_batch(captured.example_inputs)
    specs = [_spec(i + 1, view.sequence[bounds[i]:bounds[i + 1]], block, r, nodes, batch)
             for i, (block, r) in enumerate(zip(blocks, reads))]
    boundaries = [_boundary(i, name, nodes) for i, name in enumerate(boundary_nodes)]

    n = len(blocks)
    if final_cut is not None:  # the tail is the step readout: the last step's state to its output
        members = view.sequence[final_cut:]
        graph, tail_reads = _block_graph(nodes, members, last, parts[-1])
        tail = _graph_module(gm, graph, resolve, "Readout")
        return Lowered(context, context_names, input_names, blocks, specs, boundaries, constants, tail,
                       Tail(boundaries[n], _spec(n, members, tail, tail_reads, nodes, batch)),
                       Emission(dim, tuple(steps), tuple(nodes[parts[-1]].meta["hbll"].shape or ())[1:]))
    start = tail_cut(view, bounds[-2], output_tail)
    cut = _boundary(n, view.crossing[start], nodes) if start is not None else None
    if cut is not None:
        members = view.sequence[start:]
        graph, tail_reads = _block_graph(nodes, members, cut.node, view.output)
        tail = _graph_module(gm, graph, resolve, "Tail")
        tail_info = Tail(cut, _spec(n, members, tail, tail_reads, nodes, batch))
    else:
        tail, tail_info = blocks[-1], Tail(boundaries[n - 1], specs[-1])
    return Lowered(context, context_names, input_names, blocks, specs, boundaries, constants, tail, tail_info)


def tail_cut(view: GraphView, block_start: int, output_tail: str) -> int | None:
    """The legal cut where the output tail starts, for a last block starting at ``block_start``;
    None for the whole block.

    - ``"block"``: the whole block;
    - ``"head"``: the last legal cut of the block (usually right before the final linear layer, even
      when a normalisation precedes that layer: then it trains badly, see issue 12);
    - ``"auto"``: the head cut (:mod:`~hbll_compile.passes.graph`), which keeps any normalisation the
      head reads inside the tail, whatever the boundary's kind: on a sequence, couplers stand in for
      block N's attention too, since a tail that every path runs must stay small (BENCHMARKS.md, issue 13).
    """
    inner = [c for c in view.legal_cuts if c > block_start]
    if output_tail == "block" or not inner:
        return None
    if output_tail == "head":
        return inner[-1]
    return view.head_cut if view.head_cut is not None and view.head_cut > block_start else None


def _spec(
    index: int, members: list[str], module: nn.Module, reads: list[str], nodes: dict[str, fx.Node], batch: int
) -> BlockSpec:
    flops = sum(nodes[m].meta["hbll"].flops for m in members)
    return BlockSpec(
        index=index,
        nodes=tuple(members),
        flops=flops,
        param_count=sum(p.numel() for p in module.parameters()),
        context=tuple(reads),
        sample_flops=flops / batch,
    )


def _boundary(index: int, name: str, nodes: dict[str, fx.Node]) -> Boundary:
    info = nodes[name].meta["hbll"]
    return Boundary(index=index, node=name, shape=tuple(info.shape or ())[1:], dtype=info.dtype or "")


def _emitted(stack: fx.Node) -> tuple[tuple[str, ...], int]:
    """The names of the per-step outputs ``stack`` assembles, and its dim."""
    parts = cast(list[fx.Node], stack.args[0])
    return tuple(p.name for p in parts), cast(int, stack.args[1] if len(stack.args) > 1 else 0)


def _block_graph(
    nodes: dict[str, fx.Node], members: list[str], h_in: str, h_out: str, emits: list[str] | None = None,
    dim: int = 0,
) -> tuple[fx.Graph, list[str]]:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {nodes[h_in]: graph.placeholder("h")}
    context_reads: list[str] = []
    member_set = set(members)

    def value(a: fx.Node) -> fx.Node:
        if a not in env:
            if a.op == "get_attr":
                env[a] = graph.get_attr(str(a.target))
            elif a.name in member_set:
                raise LoweringError(f"node {a.name} is read before it is computed", node=a.name,
                                    remedy="report this graph to hbll-compile")
            else:
                with graph.inserting_after(_last_placeholder(graph)):
                    env[a] = graph.placeholder(a.name)
                context_reads.append(a.name)
        return env[a]

    for name in members:
        node = nodes[name]
        env[node] = graph.node_copy(node, value)
    out = env[nodes[h_out]] if nodes[h_out] in env else value(nodes[h_out])
    if emits:
        emitted = graph.call_function(torch.ops.aten.stack.default, ([env[nodes[e]] for e in emits], dim))
        graph.output((out, emitted))
    else:
        graph.output(out)
    return graph, context_reads


def _last_placeholder(graph: fx.Graph) -> fx.Node:
    return [n for n in graph.nodes if n.op == "placeholder"][-1]


def _context_graph(
    nodes: dict[str, fx.Node], inputs: list[str], context: list[str], outputs: tuple[str, ...]
) -> fx.Graph:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {nodes[name]: graph.placeholder(name) for name in inputs}

    def value(a: fx.Node) -> fx.Node:
        if a not in env:
            env[a] = graph.get_attr(str(a.target))
        return env[a]

    for name in context:
        env[nodes[name]] = graph.node_copy(nodes[name], value)
    graph.output(tuple(env[nodes[name]] for name in outputs))
    return graph


def _resolver(model: nn.Module, gm: fx.GraphModule, constants: dict[str, torch.Tensor]) -> Callable[[str], object]:
    """Map a target to the user's own object, or record it as a constant of the capture."""

    def resolve(target: str) -> object:
        found = lookup(model, target)
        if found is not None:
            return found
        found = lookup(gm, target)
        if found is None:
            raise LoweringError(f"captured attribute {target!r} was not found", node=target,
                                remedy="report this model to hbll-compile")
        if isinstance(found, torch.Tensor):
            constants[target] = found
        return found

    return resolve


def _graph_module(gm: fx.GraphModule, graph: fx.Graph, resolve: Callable[[str], object], name: str) -> fx.GraphModule:
    holder = nn.Module()
    for node in graph.nodes:
        if node.op == "call_module":
            assign(holder, node.target, gm.get_submodule(node.target))
        elif node.op == "get_attr":
            assign(holder, node.target, resolve(node.target))
    out = fx.GraphModule(holder, graph, class_name=name)
    return out


def bind_state(module: fx.GraphModule, resolve: Callable[[str], object]) -> None:
    """Point every ``get_attr`` target of ``module`` at ``resolve(target)`` (after ``.to()`` and friends)."""
    for node in module.graph.nodes:
        if node.op == "get_attr":
            assign(module, node.target, resolve(node.target))
