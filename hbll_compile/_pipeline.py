"""The compile pipeline: the passes in order, from an ``nn.Module`` to the parts of an ``HBLLModel``.

model -> capture -> graph (legal cuts) -> partition -> lower -> hierarchy -> couplers and heads -> schedule.
Each pass adds to what it receives and never recomputes what an earlier pass recorded. Both
:func:`hbll_compile.hbll_compile` and :meth:`hbll_compile.HBLLModel.load` run it; it sits below the
model so that loading needs no import of the API layer.

Example:
    >>> import torch
    >>> parts = run_passes(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)),
    ...                    (torch.randn(3, 4),), blocks=2, config=HBLLConfig())
    >>> parts.report.capture, parts.report.max_blocks, parts.schedule.name
    ('export', 2, 'hbll-wavefront')
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from hbll_compile.config import HBLLConfig
from hbll_compile.errors import CompileError
from hbll_compile.ir import CompileReport, CouplerPlan, Tree
from hbll_compile.passes.capture import (
    Captured,
    batched_float_shapes,
    capture,
    example_batch,
    preserved_buffers,
    quiet_torch_logs,
)
from hbll_compile.passes.couplers import build_couplers
from hbll_compile.passes.graph import build_graph
from hbll_compile.passes.heads import build_heads
from hbll_compile.passes.hierarchy import build_tree
from hbll_compile.passes.lower import Lowered, lower
from hbll_compile.passes.partition import choose_cuts
from hbll_compile.passes.unroll import emitted_outputs, final_state_cut, time_cuts
from hbll_compile.runtime.schedule import Schedule, build_bp, build_dgl, build_hbll, build_tbptt

__all__ = ["Parts", "build_schedule", "run_passes"]


@dataclass
class Parts:
    """Everything the passes produced; :class:`~hbll_compile.model.HBLLModel` is built from it."""

    captured: Captured
    lowered: Lowered
    tree: Tree
    couplers: nn.ModuleDict
    coupler_plans: list[CouplerPlan]
    heads: nn.ModuleDict
    schedule: Schedule
    report: CompileReport


def run_passes(
    model: nn.Module, example_inputs: Sequence[Any] | torch.Tensor, *, blocks: int | None,
    config: HBLLConfig,
) -> Parts:
    """Run every pass on ``model``; refusals are the passes' own ``CompileError`` subclasses. torch's
    compile-time logging is silenced, and ``model``'s buffers are as before afterwards."""
    with quiet_torch_logs(), preserved_buffers(model):
        captured = capture(model, example_inputs, over=config.over)
        assembly = emitted_outputs(captured.gm) if config.over == "time" else None
        view = build_graph(captured.gm, assembly=assembly)
        if config.over == "time":  # blocks are chunks of time steps
            view = replace(view, block_cuts=time_cuts(captured.gm, view))
        final_cut = final_state_cut(captured.gm, view) if assembly is not None else None
        partition = choose_cuts(view.costs, view.block_cuts, blocks, view.owns_params)
        lowered = lower(captured, view, partition, model, output_tail=config.output_tail, final_cut=final_cut)
    tree = build_tree(partition.block_costs)
    emits = lowered.emission is not None
    if emits and config.objective == "dgl":
        raise CompileError("objective='dgl' trains local heads on the chunks' states, but this model emits an "
                           "output at every time step, and a chunk that trains only on its own outputs from a "
                           "detached state is truncated BPTT", node="objective",
                           remedy="use objective='tbptt' for that baseline, or 'hbll' / 'bp'")
    couplers, plans = build_couplers(tree, lowered.boundaries, lowered.specs, lowered.tail_info, config,
                                     batched_float_shapes(captured), emits=emits)
    heads = nn.ModuleDict() if emits else build_heads(lowered.boundaries, config)  # the emitted loss is local
    report = CompileReport(
        capture=captured.method,
        legal_cuts=len(view.legal_cuts),
        max_blocks=partition.max_blocks,
        block_costs=tuple(partition.block_costs),
        context=tuple(lowered.context_names),
        example_batch=example_batch(captured.example_inputs),
        example_inputs=tuple((tuple(x.shape), str(x.dtype).removeprefix("torch.")) for x in captured.example_inputs),
    )
    schedule = build_schedule(tree, config, frozenset(int(i) for i in heads), emits=emits)
    return Parts(captured, lowered, tree, couplers, plans, heads, schedule, report)


def build_schedule(tree: Tree, config: HBLLConfig, heads: frozenset[int] = frozenset(), *, emits: bool = False
                   ) -> Schedule:
    """The training-step schedule the config asks for; ``heads``: the boundaries that have a local head;
    ``emits``: every chunk emits outputs (see :class:`~hbll_compile.ir.Emission`)."""
    if config.objective == "bp":
        return build_bp(tree.n_blocks)
    if config.objective == "dgl":
        return build_dgl(tree.n_blocks)
    if config.objective == "tbptt":
        return build_tbptt(tree.n_blocks, emits=emits)
    return build_hbll(tree, inputs=config.inputs, corrections=config.corrections, correction=config.correction,
                      heads=heads)
