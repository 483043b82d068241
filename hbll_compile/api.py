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

import torch
from torch import nn

from hbll_compile._pipeline import run_passes
from hbll_compile._util import max_abs_diff
from hbll_compile.config import HBLLConfig
from hbll_compile.errors import CompileError, LoweringError
from hbll_compile.model import HBLLModel

__all__ = ["hbll_compile"]

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
    config = config or HBLLConfig()
    parts = run_passes(model, example_inputs, blocks=blocks, config=config)
    compiled = HBLLModel(model, parts, loss=loss, config=config)
    _verify(compiled, model, parts.captured.example_inputs)
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
    diff = max_abs_diff(expected, got)
    if diff > VERIFY_TOLERANCE:
        raise LoweringError(
            f"the chain of blocks differs from the model by {diff:.3g} (max abs) on the example inputs",
            node="output",
            remedy="the model may read global state or be non-deterministic in eval mode; "
            "report it to hbll-compile with the model definition",
        )
