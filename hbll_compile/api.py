"""``hbll_compile``: the entry point. It checks its arguments, runs the passes in order
(:mod:`hbll_compile._pipeline`) and returns a verified :class:`HBLLModel`.

Example:
    >>> import torch, hbll_compile as hc
    >>> net = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(6)])
    >>> m = hc.hbll_compile(net, (torch.randn(2, 8),), blocks=3)
    >>> len(m.blocks), m.tree.depth
    (3, 2)
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from hbll_compile._pipeline import run_passes
from hbll_compile._util import first_line, max_abs_diff
from hbll_compile.config import HBLLConfig, Over
from hbll_compile.errors import CompileError, LoweringError
from hbll_compile.model import HBLLModel
from hbll_compile.passes.capture import Captured, preserved_buffers, quiet_torch_logs

__all__ = ["hbll_compile"]

VERIFY_TOLERANCE = 1e-5


def hbll_compile(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    *,
    blocks: int | None = None,
    loss: Callable[..., torch.Tensor] | None = None,
    config: HBLLConfig | None = None,
    over: Over | None = None,
) -> HBLLModel:
    """Compile ``model`` into ``blocks`` blocks arranged in a balanced binary tree.

    Args:
        model: any ``nn.Module`` whose forward returns one tensor. Its parameters are shared, not copied;
            compiling leaves its buffers and the example tensors as they were.
        example_inputs: one example batch per forward argument: dim 0 of the first is the batch
            dimension and needs at least 2 rows, so it stays dynamic (see
            :func:`~hbll_compile.passes.capture.capture` for the full rule).
        blocks: N (an int >= 1; not a bool or float), or ``None`` for the rule of
            :func:`~hbll_compile.passes.partition.auto_blocks` (a power of two up to 8 that leaves no
            block below a quarter of its share of the FLOPs).
        loss: the task loss ``loss(output, target)``, used by training.
        config: :class:`HBLLConfig`.
        over: ``"depth"`` (the default) cuts the layers; ``"time"`` cuts a recurrent model (``nn.RNN``,
            ``nn.GRU``, ``nn.LSTM``, or a Python loop over ``nn.RNNCell``/``nn.GRUCell``/``nn.LSTMCell``)
            into ``blocks`` chunks of consecutive time steps, whose boundaries are the recurrent state
            (DESIGN §4, :mod:`~hbll_compile.passes.unroll`). The chunks share the module's own
            weights; ``objective`` may then also be ``"tbptt"``. A model may read the last step only or
            output every step (a language model, whose loss must then split over steps; see
            :class:`~hbll_compile.ir.Emission`). Overrides ``config.over`` when given.

    The returned model checks the shape guards of the capture on every call (see
    :mod:`~hbll_compile.passes.guards`); it is verified against ``model`` on the example batch and on
    a second batch of another size that passes those guards (the example's rows, cycled).

    Raises:
        CompileError: a subclass naming the node, the reason and a remedy, when an argument is invalid
            or the model cannot be captured, cut into ``blocks`` blocks, or lowered exactly.
    """
    blocks = _check_arguments(model, blocks, loss, config)
    config = config or HBLLConfig()
    if over is not None:
        if over not in ("depth", "time"):
            raise CompileError(f"over must be 'depth' or 'time', got {over!r}", node="over",
                               remedy="pass over='depth' (cut the layers) or over='time' (cut a recurrent model's "
                               "time steps)")
        config = dataclasses.replace(config, over=over)
    if config.objective == "tbptt" and config.over != "time":
        raise CompileError("objective='tbptt' (truncated backprop through time) needs chunks of time steps",
                           node="objective", remedy="compile a recurrent model with over='time', or pick "
                           "objective 'hbll', 'dgl' or 'bp'")
    if config.over == "time" and config.executor == "batched":
        raise CompileError("executor='batched' stacks the weights of distinct blocks, but over='time' chunks all "
                           "share one set of weights, so there is nothing to stack", node="executor",
                           remedy="use executor='loop' (the default) with over='time'")
    parts = run_passes(model, example_inputs, blocks=blocks, config=config)
    compiled = HBLLModel(model, parts, loss=loss, config=config)
    with quiet_torch_logs():
        _verify(compiled, model, parts.captured)
    return compiled


def _check_arguments(model: Any, blocks: Any, loss: Any, config: Any) -> int | None:
    """Refuse arguments of the wrong type before any work (``blocks=2.5`` must not become 2)."""
    if not isinstance(model, nn.Module):
        raise CompileError(f"expected an nn.Module, got {type(model).__name__}", node="model",
                           remedy="pass the model object itself")
    if blocks is not None and (isinstance(blocks, bool) or not isinstance(blocks, numbers.Integral)):
        raise CompileError(f"blocks must be an int or None, got {blocks!r} ({type(blocks).__name__})",
                           node="blocks", remedy="pass the number of blocks as an int, e.g. blocks=4, or "
                           "blocks=None for the automatic choice")
    if loss is not None and not callable(loss):
        raise CompileError(f"loss must be callable, got {type(loss).__name__}", node="loss",
                           remedy="pass a function loss(output, target), e.g. torch.nn.functional.cross_entropy")
    if config is not None and not isinstance(config, HBLLConfig):
        raise CompileError(f"config must be an HBLLConfig, got {type(config).__name__}", node="config",
                           remedy="pass hbll_compile.HBLLConfig(...)")
    return None if blocks is None else int(blocks)


def _verify(compiled: HBLLModel, model: nn.Module, captured: Captured) -> None:
    """Refuse to return blocks whose composition differs from the model (eval mode, state restored
    before each run), on the example batch and on one more batch size that passes the guards."""
    inputs, guards = captured.example_inputs, captured.guards
    batches = {"the example inputs": inputs}
    rows = inputs[0].shape[0]
    second = (guards.resized(inputs, n) for n in (rows + 1, rows - 1, 2 * rows, 2 * rows + 1))
    admitted = next((batch for batch in second if guards.admits(*batch)), None)
    if admitted is not None:
        batches[f"a second batch of {admitted[0].shape[0]} rows (the example's, cycled)"] = admitted
    was_training = model.training
    compiled.eval()
    try:
        for what, batch in batches.items():
            expected, got = _run(model, batch, what), _run(compiled, batch, what)
            diff = max_abs_diff(expected, got)
            if diff > VERIFY_TOLERANCE:
                raise LoweringError(
                    f"the chain of blocks differs from the model by {diff:.3g} (max abs) on {what}",
                    node="output",
                    remedy="the model may read global state or be non-deterministic in eval mode; "
                    "report it to hbll-compile with the model definition",
                )
    finally:
        compiled.train(was_training)


def _run(module: nn.Module, inputs: tuple[torch.Tensor, ...], what: str) -> Any:
    """``module`` on copies of ``inputs`` with its buffers put back afterwards, so both runs see one state."""
    with preserved_buffers(module), torch.no_grad():
        try:
            return module(*(x.clone() for x in inputs))
        except CompileError:
            raise
        except Exception as err:  # noqa: BLE001 - reported as a failed verification, with the cause chained
            raise LoweringError(
                f"{type(module).__name__} fails on {what}: {type(err).__name__}: "
                f"{first_line(err)}",
                node="output",
                remedy="the model's forward may depend on the batch size in a way torch.export did not record; "
                "report it to hbll-compile with the model definition",
            ) from err
