"""``hbll_compile``: the entry point. It runs the passes in order and returns an :class:`HBLLModel`.

Example:
    >>> import torch, hbll_compile as hc
    >>> net = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(6)])
    >>> m = hc.hbll_compile(net, (torch.randn(2, 8),), blocks=3)
    >>> len(m.blocks), m.tree.depth
    (3, 2)
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from hbll_compile.config import HBLLConfig
from hbll_compile.errors import CompileError, LoweringError
from hbll_compile.ir import Tree
from hbll_compile.model import HBLLModel
from hbll_compile.passes.capture import Captured, capture, preserved_buffers, quiet_torch_logs
from hbll_compile.passes.couplers import build_couplers
from hbll_compile.passes.graph import build_graph
from hbll_compile.passes.heads import build_heads
from hbll_compile.passes.hierarchy import build_tree
from hbll_compile.passes.lower import lower
from hbll_compile.passes.partition import choose_cuts
from hbll_compile.runtime.schedule import Schedule, build_bp, build_dgl, build_hbll

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
        model: any ``nn.Module`` whose forward returns one tensor. Its parameters are shared, not copied;
            compiling leaves its buffers and the example tensors as they were.
        example_inputs: one example batch per forward argument: dim 0 of the first is the batch
            dimension and needs at least 2 rows, so it stays dynamic (see
            :func:`~hbll_compile.passes.capture.capture` for the full rule).
        blocks: N (an int >= 1; not a bool or float), or ``None`` for the largest power of two not
            above min(8, legal maximum).
        loss: the task loss ``loss(output, target)``, used by training.
        config: :class:`HBLLConfig`.

    The returned model checks the shape guards of the capture on every call (see
    :mod:`~hbll_compile.passes.guards`); it is verified against ``model`` on the example batch and on
    a second batch of another size that passes those guards (the example's rows, cycled).

    Raises:
        CompileError: a subclass naming the node, the reason and a remedy, when an argument is invalid
            or the model cannot be captured, cut into ``blocks`` blocks, or lowered exactly.
    """
    blocks = _check_arguments(model, blocks, loss, config)
    with quiet_torch_logs(), preserved_buffers(model):
        captured = capture(model, example_inputs)
        view = build_graph(captured.gm)
        partition = choose_cuts(view.costs, view.legal_cuts, blocks)
        config = config or HBLLConfig()
        lowered = lower(captured, view, partition, model, output_tail=config.output_tail)
        tree = build_tree(partition.block_costs)
        example_batch = int(captured.example_inputs[0].shape[0])
        couplers, plans = build_couplers(tree, lowered.boundaries, lowered.specs, lowered.tail_info, config,
                                         example_batch)
        heads = build_heads(lowered.boundaries, config)
        report = {
            "capture": captured.method,
            "legal_cuts": len(view.legal_cuts),
            "max_blocks": len(view.legal_cuts) + 1,
            "block_costs": partition.block_costs,
            "context": list(lowered.context_names),
            "example_batch": example_batch,
            "example_inputs": [(tuple(x.shape), str(x.dtype).removeprefix("torch."))
                               for x in captured.example_inputs],
        }
        compiled = HBLLModel(model, lowered, tree, couplers, plans, heads, build_schedule(tree, config),
                             loss=loss, config=config, report=report, guards=captured.guards)
        _verify(compiled, model, captured)
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


def load(
    path: str, model_factory: Callable[[], nn.Module], *, loss: Callable[..., torch.Tensor] | None = None
) -> HBLLModel:
    """Rebuild a model saved with :meth:`HBLLModel.save`: compile ``model_factory()`` with the saved
    block count, config and input shapes, then load every saved tensor (strictly).

    Example:
        >>> import torch, tempfile, os, hbll_compile as hc
        >>> factory = lambda: torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> m = hc.hbll_compile(factory(), (torch.randn(2, 4),), blocks=2)
        >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors"); m.save(path)
        >>> x = torch.randn(3, 4); torch.equal(hc.HBLLModel.load(path, factory)(x), m(x))
        True
    """
    from safetensors import safe_open
    from safetensors.torch import load_model

    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
    if "hbll" not in metadata:
        raise CompileError(f"{path} was not written by HBLLModel.save", node=path,
                           remedy="save compiled models with m.save(path)")
    settings = json.loads(metadata["hbll"])
    examples = tuple(torch.zeros(shape, dtype=getattr(torch, dtype)) for shape, dtype in settings["example_inputs"])
    compiled = hbll_compile(model_factory(), examples, blocks=settings["blocks"], loss=loss,
                            config=HBLLConfig.from_dict(settings["config"]))
    load_model(compiled, path, strict=True)
    return compiled


def build_schedule(tree: Tree, config: HBLLConfig) -> Schedule:
    """The training-step schedule the config asks for."""
    if config.objective == "bp":
        return build_bp(tree.n_blocks)
    if config.objective == "dgl":
        return build_dgl(tree.n_blocks)
    return build_hbll(tree, inputs=config.inputs, corrections=config.corrections, correction=config.correction,
                      head_weight=config.local_head_weight)


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
            diff = _max_abs_diff(expected, got)
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
                f"{(str(err).strip() or '?').splitlines()[0]}",
                node="output",
                remedy="the model's forward may depend on the batch size in a way torch.export did not record; "
                "report it to hbll-compile with the model definition",
            ) from err


def _max_abs_diff(a: Any, b: Any) -> float:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
        return float("inf")
    if a.is_floating_point():
        return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
    return 0.0 if torch.equal(a, b) else float("inf")
