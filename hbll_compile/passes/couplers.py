"""Build one coupler per internal tree node (DESIGN §1, "Coupler").

A coupler for node v with span (a, b] maps boundary a to an estimate of boundary b. Its FLOP budget
is ``config.coupler_cost`` times the per-sample FLOPs of the span it stands for. Where the span starts
at the model input and that input is not a float tensor (token ids), the coupler first runs block 1
exactly (as a fixed feature extractor) and couples from boundary 1.

Example:
    >>> import torch, hbll_compile as hc
    >>> net = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(4)])
    >>> m = hc.hbll_compile(net, (torch.randn(2, 8),), blocks=4)
    >>> [(p.span, p.source) for p in m.coupler_plans]
    [((0, 4), 0), ((0, 2), 0), ((2, 4), 2)]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hbll_compile.config import HBLLConfig
from hbll_compile.ir import BlockSpec, Boundary, Tree
from hbll_compile.nn.coupling import Coupler


@dataclass(frozen=True)
class CouplerPlan:
    """What was built for one internal node; the runtime reads ``source`` instead of re-deriving it."""

    node: int
    span: tuple[int, int]
    source: int
    """The boundary the coupler reads: ``span[0]``, or 1 when it first runs block 1 on token ids."""
    budget: int
    flops: int
    hidden: int


def build_couplers(
    tree: Tree, boundaries: list[Boundary], specs: list[BlockSpec], config: HBLLConfig, example_batch: int
) -> tuple[nn.ModuleDict, list[CouplerPlan]]:
    """Couplers keyed by ``str(node.id)``, seeded by ``config.seed`` (the global RNG is left untouched)."""
    couplers, plans = nn.ModuleDict(), []
    per_sample = [spec.flops / max(example_batch, 1) for spec in specs]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        for node in tree.internal_nodes:
            a, b = node.span
            source = 1 if a == 0 and not _is_float(boundaries[0]) else a
            budget = max(1, int(config.coupler_cost * sum(per_sample[source:b])))
            coupler = Coupler.for_budget(boundaries[source].shape, boundaries[b].shape, budget,
                                         n_layers=config.coupler_layers)
            couplers[str(node.id)] = coupler
            plans.append(CouplerPlan(node.id, node.span, source, budget, coupler.flops(), coupler.hidden))
    return couplers, plans


def _is_float(boundary: Boundary) -> bool:
    return boundary.dtype.startswith(("float", "bfloat", "complex"))
