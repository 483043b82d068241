"""``hbll_compile``: the entry point. It runs the passes in order and returns an :class:`HBLLModel`.

Example:
    >>> import torch, hbll_compile as hc
    >>> net = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(6)])
    >>> m = hc.hbll_compile(net, (torch.randn(2, 8),), blocks=3)
    >>> len(m.blocks), m.tree.depth
    (3, 2)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from hbll_compile.config import HBLLConfig
from hbll_compile.errors import CompileError, LoweringError
from hbll_compile.model import HBLLModel
from hbll_compile.passes.capture import capture
from hbll_compile.passes.graph import build_graph
from hbll_compile.passes.hierarchy import build_tree
from hbll_compile.passes.lower import lower
from hbll_compile.passes.partition import choose_cuts

VERIFY_TOLERANCE = 1e-5


def hbll_compile(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    *,
    blocks: int | None = None,
    loss: Callable[..., torch.Tensor] | None = None,
    config: HBLLConfig | None = None,
) -> HBLLModel:
    """Compile ``model`` into ``blocks`` blocks arranged in a balanced binary tree.

    Args:
        model: any ``nn.Module`` whose forward returns one tensor. Its parameters are shared, not copied.
        example_inputs: one example batch per forward argument (use a batch of at least 2, so the
            batch dimension stays dynamic).
        blocks: N, or ``None`` for the largest power of two not above min(8, legal maximum).
        loss: the task loss ``loss(output, target)``, used by training.
        config: :class:`HBLLConfig`.

    Raises:
        CompileError: a subclass naming the node, the reason and a remedy, when the model cannot be
            captured, cut into ``blocks`` blocks, or lowered exactly.
    """
    if not isinstance(model, nn.Module):
        raise CompileError(f"expected an nn.Module, got {type(model).__name__}", node="model",
                           remedy="pass the model object itself")
    captured = capture(model, example_inputs)
    view = build_graph(captured.gm)
    partition = choose_cuts(view.costs, view.legal_cuts, blocks)
    lowered = lower(captured, view, partition, model)
    tree = build_tree(partition.block_costs)
    report = {
        "capture": captured.method,
        "legal_cuts": len(view.legal_cuts),
        "max_blocks": len(view.legal_cuts) + 1,
        "block_costs": partition.block_costs,
        "context": list(lowered.context_names),
    }
    compiled = HBLLModel(model, lowered, tree, loss=loss, config=config, report=report)
    _verify(compiled, model, captured.example_inputs)
    return compiled


def _verify(compiled: HBLLModel, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    """Refuse to return blocks whose composition differs from the model (eval mode, no state change)."""
    was_training = model.training
    compiled.eval()
    try:
        with torch.no_grad():
            expected, got = model(*inputs), compiled(*inputs)
    finally:
        compiled.train(was_training)
    diff = _max_abs_diff(expected, got)
    if diff > VERIFY_TOLERANCE:
        raise LoweringError(
            f"the chain of blocks differs from the model by {diff:.3g} (max abs) on the example inputs",
            node="output",
            remedy="the model may read global state or be non-deterministic in eval mode; "
            "report it to hbll-compile with the model definition",
        )


def _max_abs_diff(a: Any, b: Any) -> float:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
        return float("inf")
    if a.is_floating_point():
        return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
    return 0.0 if torch.equal(a, b) else float("inf")
