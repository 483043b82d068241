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
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from hbll_compile.config import HBLLConfig
from hbll_compile.errors import CompileError, LoweringError
from hbll_compile.ir import Tree
from hbll_compile.model import HBLLModel
from hbll_compile.passes.capture import capture
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
        model: any ``nn.Module`` whose forward returns one tensor. Its parameters are shared, not copied.
        example_inputs: one example batch per forward argument (use a batch of at least 2, so the
            batch dimension stays dynamic).
        blocks: N, or ``None`` for the rule of :func:`~hbll_compile.passes.partition.auto_blocks` (a power
            of two up to 8 that leaves no block below a quarter of its share of the FLOPs).
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
    partition = choose_cuts(view.costs, view.block_cuts, blocks, view.owns_params)
    config = config or HBLLConfig()
    lowered = lower(captured, view, partition, model, output_tail=config.output_tail)
    tree = build_tree(partition.block_costs)
    example_batch = int(captured.example_inputs[0].shape[0]) if captured.example_inputs[0].dim() else 1
    couplers, plans = build_couplers(tree, lowered.boundaries, lowered.specs, lowered.tail_info, config,
                                     example_batch)
    heads = build_heads(lowered.boundaries, config)
    report = {
        "capture": captured.method,
        "legal_cuts": len(view.legal_cuts),
        "max_blocks": partition.max_blocks,
        "block_costs": partition.block_costs,
        "context": list(lowered.context_names),
        "example_batch": example_batch,
        "example_inputs": [(tuple(x.shape), str(x.dtype).removeprefix("torch.")) for x in captured.example_inputs],
    }
    compiled = HBLLModel(model, lowered, tree, couplers, plans, heads, build_schedule(tree, config),
                         loss=loss, config=config, report=report)
    _verify(compiled, model, captured.example_inputs)
    return compiled


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
