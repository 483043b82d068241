"""Build one coupler per internal tree node (DESIGN §1, "Coupler").

A coupler for node v with span (a, b] maps boundary a to an estimate of boundary b. It may run some
of the model's own blocks exactly, as fixed maps, around its learned part:
- first the blocks a+1..``source``: block 1 where the span starts at the model input and that input is
  not a float tensor (token ids), and the first ``config.coupler_copies`` blocks of the span (frozen
  copies; never the last block, so the learned part always stands in for at least one);
- where the span ends at the model output (b = N), it couples into the input of the model's output
  *tail* (block N from its last legal cut on, e.g. the final linear layer; see
  :class:`~hbll_compile.ir.Tail`) and then runs the tail (``runs_tail``). DESIGN §1 crops channels
  into the logits instead; measured on MNIST, keeping the model's own head in every path was far more
  accurate (BENCHMARKS.md). Running only the tail, not all of block N, keeps the N paths that end
  there cheap.

The learned part's FLOP budget is ``config.coupler_cost`` times the per-sample FLOPs of one block of the
graph it stands in for (blocks ``source`` + 1 .. ``b``, less the tail when it runs one, over ``b -
source``), or under ``config.coupler_budget="span"`` times that graph's whole FLOPs.

Options: ``config.coupler_mixing`` is handed to the coupling layers (token mixing on sequences).
Under ``config.coupler_condition="label"`` every coupler gets its own
:class:`~hbll_compile.nn.coupling.LabelEmbedding` of ``LABEL_DIM`` features as encoder (see
:func:`label_layout` for which outputs qualify). The embeddings are drawn from their own seeded RNG
streams, so every other coupler weight is the same as without conditioning.

Over time (``config.over == "time"``, DESIGN §4) a coupler is ``C_v(h_a, inputs of (a, b])``: it maps the
recurrent state at a to an estimate of the state at b, conditioned on the span's per-step inputs (the
float context values its chunks read, :attr:`~hbll_compile.ir.CouplerPlan.condition`). Its encoder, a
linear map of their flattened concatenation, summarises them into the condition vector, so the coupler
stays exactly invertible in ``h_a`` for fixed inputs. Its state at time 0 is the one after chunk 1
(``source = 1``, chunk 1 runs exactly first), since boundary 0 is the input sequence, not a state. The
encoder's FLOPs count against the budget.

Example:
    >>> import torch, hbll_compile as hc
    >>> net = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(4)])
    >>> m = hc.hbll_compile(net, (torch.randn(2, 8),), blocks=4)
    >>> [(p.span, p.source, p.sink, p.runs_tail) for p in m.coupler_plans]
    [((0, 4), 0, 3, True), ((0, 2), 0, 2, False), ((2, 4), 2, 3, True)]
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hbll_compile.config import HBLLConfig
from hbll_compile.errors import LoweringError
from hbll_compile.ir import BlockSpec, Boundary, CouplerPlan, Tail, Tree
from hbll_compile.nn.coupling import Coupler, LabelEmbedding

__all__ = ["LABEL_DIM", "build_couplers", "label_layout"]

LABEL_DIM = 32
"""Size of a label-conditioned coupler's label embedding."""

_OPTION = "HBLLConfig.coupler_condition='label'"


def label_layout(output: Boundary) -> tuple[int, tuple[int, ...]]:
    """``(num_classes, label_shape)`` for label-conditioned couplers on a model whose output is ``output``.

    Rules: the output must be float logits, (C,) per sample (labels of shape (B,)) or (T, C) per token
    (labels of shape (B, T), a language model's next tokens); ``label_shape`` is the per-sample shape
    of the labels, ``()`` or ``(T,)``.

    Raises:
        LoweringError: any other output, naming the option and what to do instead.
    """
    if not _is_float(output) or len(output.shape) not in (1, 2):
        raise LoweringError(f"{_OPTION} needs class logits (C,) or per-token logits (T, C) as the model output, "
                            f"but the output is {output.dtype} of per-sample shape {output.shape}",
                            node=f"boundary {output.index} ({output.node})",
                            remedy="use coupler_condition='none' for models that do not classify")
    return output.shape[-1], tuple(output.shape[:-1])


def build_couplers(
    tree: Tree, boundaries: list[Boundary], specs: list[BlockSpec], tail: Tail, config: HBLLConfig,
    context_shapes: dict[str, tuple[int, ...]] | None = None, *, emits: bool = False,
) -> tuple[nn.ModuleDict, list[CouplerPlan]]:
    """Couplers keyed by ``str(node.id)``, seeded by ``config.seed`` (the global RNG is left untouched).
    ``context_shapes`` gives the per-sample shape of every float context value with a batch dimension
    (the possible conditions over time). With ``emits`` (an :class:`~hbll_compile.ir.Emission`) the
    couplers ending at boundary N estimate the final state and run no tail.

    Raises:
        LoweringError: a coupler cannot be built between two boundary shapes.
    """
    couplers, plans = nn.ModuleDict(), []
    over_time = config.over == "time"
    per_sample = [spec.sample_flops for spec in specs]
    tail_flops = tail.spec.sample_flops
    labels = label_layout(boundaries[-1]) if config.coupler_condition == "label" else None
    if labels and over_time:
        raise LoweringError(f"{_OPTION} is not available over time, where couplers are conditioned on the "
                            "span's inputs", node="config.coupler_condition",
                            remedy="use coupler_condition='none' with over='time'")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        for node in tree.internal_nodes:
            a, b = node.span
            first = 1 if a == 0 and (over_time or not _is_float(boundaries[0])) else a
            source = max(first, min(a + config.coupler_copies, b - 1))
            runs_tail = b == tree.n_blocks and not emits  # an emitting model's tail is a step readout
            written = tail.input if runs_tail else boundaries[b]
            stands_for = sum(per_sample[source:b]) - (tail_flops if runs_tail else 0)
            per = b - source if config.coupler_budget == "block" else 1  # so a path costs O(log N) blocks' shares
            budget = max(1, int(config.coupler_cost * stands_for / per))
            condition = _span_inputs(specs[source:b], context_shapes or {}) if over_time else ()
            raw = sum(math.prod(context_shapes[name]) for name in condition) if context_shapes else 0
            cond_dim = min(raw, math.prod(written.shape))
            encoder: nn.Module | None = nn.Linear(raw, cond_dim) if cond_dim else None
            encoder_flops = 2 * raw * cond_dim
            if labels:  # a label embedding is a lookup: no FLOPs
                cond_dim, encoder = LABEL_DIM, _label_embedding(labels, node.id, config)
            try:
                coupler = Coupler.for_budget(boundaries[source].shape, written.shape, max(1, budget - encoder_flops),
                                             n_layers=config.coupler_layers, gain=config.coupler_gain,
                                             cond_dim=cond_dim, encoder=encoder, mixing=config.coupler_mixing)
            except ValueError as err:
                raise LoweringError(f"cannot build the coupler of span {node.span}: {err}",
                                   node=f"boundary {source} ({boundaries[source].node})",
                                   remedy="choose another block count, or train with objective='dgl' or 'bp', "
                                   "which need no couplers") from err
            if labels and labels[1] and (len(coupler.space) != 2 or coupler.space[:1] != labels[1]):
                raise LoweringError(f"{_OPTION} with per-token labels needs couplers that work on token sequences "
                                    f"of length {labels[1][0]}, but the coupler of span {node.span} works on "
                                    f"{coupler.space}", node=f"boundary {source} ({boundaries[source].node})",
                                    remedy="use coupler_condition='none', or another block count")
            couplers[str(node.id)] = coupler
            plans.append(CouplerPlan(node.id, node.span, source, written.index, runs_tail, budget,
                                     coupler.flops() + encoder_flops, coupler.hidden, condition))
    return couplers, plans


def _label_embedding(labels: tuple[int, tuple[int, ...]] | None, node: int, config: HBLLConfig) -> nn.Module | None:
    """The label embedding of coupler ``node``, drawn from its own RNG stream (``config.seed``, node)."""
    if labels is None:
        return None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed * 1_000_003 + node + 1)
        return LabelEmbedding(labels[0], LABEL_DIM, config.label_dropout)


def _span_inputs(specs: list[BlockSpec], shapes: dict[str, tuple[int, ...]]) -> tuple[str, ...]:
    """The float context values with a batch dimension that the chunks ``specs`` read, in order, once each."""
    return tuple(dict.fromkeys(name for spec in specs for name in spec.context if name in shapes))


def _is_float(boundary: Boundary) -> bool:
    return boundary.dtype.startswith(("float", "bfloat", "complex"))
