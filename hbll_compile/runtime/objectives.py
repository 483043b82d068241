"""The local losses of DESIGN §2, written once: every executor and the onnxruntime-training export call
:func:`update_loss` for an update task and backward into :func:`trainable` of that task.

- :func:`path_loss`: the task loss of ``h`` sent through the hierarchical path P(i -> N);
- :func:`block_loss`: a block update's path loss, plus its fused local head's weighted loss;
- :func:`coupler_loss`: a coupler's consistency term plus its own path loss;
- :func:`head_loss`: a local head's task loss;
- :func:`emitted_loss`: over time, for a model that outputs every step (an
  :class:`~hbll_compile.ir.Emission`), the share of the task loss that some steps' outputs carry. Chunk
  i's objective is then its own steps' share plus the path loss of the later steps: a leaf of its path
  (a later chunk, run exactly) adds its steps' share, a coupler the share of the one step whose output
  the step readout (the tail) makes from its estimate of the state at the span's end. Weighting that
  one output as the share of every step the coupler skips made a char-level LSTM diverge (BENCHMARKS.md);
- :func:`decomposition`: checks that the task loss splits over time steps, as the above needs.

The path's own modules are applied *frozen* (see ``Units.run_node``), so a loss reaches only the
unit that computed ``h``.

Example:
    >>> import torch
    >>> consistency(torch.ones(2, 3), torch.zeros(2, 3)).item()
    1.0
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from hbll_compile.config import HBLLConfig
from hbll_compile.errors import TrainingError
from hbll_compile.ir import BlockSpec, Emission, Tree
from hbll_compile.runtime.schedule import Task, TaskKind

__all__ = [
    "Env",
    "LocalLoss",
    "Units",
    "block_loss",
    "consistency",
    "coupler_loss",
    "decomposition",
    "emitted_loss",
    "head_loss",
    "path_loss",
    "trainable",
    "update_loss",
]

Env = dict[str, Any]


class Units(Protocol):
    """What the runtime needs of a compiled model (``HBLLModel`` implements it)."""

    tree: Tree
    config: HBLLConfig
    blocks: nn.ModuleList
    specs: list[BlockSpec]
    couplers: nn.ModuleDict
    heads: nn.ModuleDict
    task_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None
    emission: Emission | None
    reduction: Literal["mean", "sum"] | None

    def environment(self, *inputs: torch.Tensor, target: torch.Tensor | None = None) -> Env: ...

    def run_block(self, i: int, h: torch.Tensor, env: Env) -> torch.Tensor: ...

    def run_coupler(self, node: int, h: torch.Tensor, env: Env) -> torch.Tensor: ...

    def run_node(self, node: int, h: torch.Tensor, env: Env) -> torch.Tensor: ...

    def run_tail(self, t: torch.Tensor, env: Env) -> torch.Tensor: ...

    def emitted(self, i: int, env: Env) -> torch.Tensor: ...

    def score(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor: ...


class LocalLoss(NamedTuple):
    """``task``: the task loss an update reports; ``total``: what its backward runs on (it adds a fused
    head's weighted loss, or is the coupler's whole objective)."""

    task: torch.Tensor
    total: torch.Tensor


def path_loss(units: Units, path: Sequence[int], h: torch.Tensor, y: torch.Tensor, env: Env) -> torch.Tensor:
    """``ℓ(P(h), y)``: the task loss after the tree nodes of ``path`` (empty for block N). With an
    emission, the shares of the steps after ``h`` (module docstring); 0 for an empty path."""
    emission = units.emission
    if emission is None:
        for node in path:
            h = units.run_node(node, h, env)
        return units.score(h, y)
    loss = h.new_zeros(())
    for node in path:
        h = units.run_node(node, h, env)
        tree_node = units.tree.nodes[node]
        first, last = emission.span(tree_node.span[0] + 1)[0], emission.span(tree_node.span[1])[1]
        if tree_node.is_leaf:
            loss = loss + emitted_loss(units, units.emitted(tree_node.span[1], env), y, (first, last))
        else:
            readout = units.run_tail(h, env).unsqueeze(emission.dim)
            loss = loss + emitted_loss(units, readout, y, (last - 1, last))
    return loss


def emitted_loss(units: Units, outputs: torch.Tensor, y: torch.Tensor, steps: tuple[int, int]) -> torch.Tensor:
    """The share of the whole sequence's task loss that the outputs of time steps ``steps`` (a half-open
    range) carry: their loss against the target's same steps, times ``len(steps) / T`` under a mean
    over steps (as is under a sum)."""
    emission, reduction = units.emission, units.reduction
    if emission is None or reduction is None:
        raise ValueError("emitted_loss needs an emitting model whose loss decomposition was checked")
    a, b = steps
    piece = units.score(outputs, y.narrow(emission.dim, a, b - a))
    return piece * ((b - a) / emission.length) if reduction == "mean" else piece


def decomposition(
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], emission: Emission, batch: int, y: torch.Tensor
) -> Literal["mean", "sum"]:
    """How ``loss`` splits over the chunks' time steps, checked on two random outputs ``o`` for target
    ``y``: ``"mean"`` when ``loss(o, y)`` equals ``Σ_i (T_i / T) loss(o_i, y_i)`` (``o_i``, ``y_i``: chunk
    i's ``T_i`` steps), ``"sum"`` when it equals ``Σ_i loss(o_i, y_i)``.

    Raises:
        TrainingError: ``y`` has no time dimension of length T, or ``loss`` is neither (it reads only some
            steps, weighs them unevenly, or mixes them), so no chunk could train on its own steps.
    """
    dim, length = emission.dim, emission.length
    if y.dim() <= dim or y.shape[dim] != length:
        raise TrainingError(f"the model outputs {length} time steps along dim {dim}, but the target has shape "
                            f"{tuple(y.shape)}", node="target",
                            remedy=f"pass one target per step, with the {length} steps along dim {dim}")
    shape = [batch, *emission.step_shape]
    shape.insert(dim, length)
    dtype = y.dtype if y.is_floating_point() else torch.get_default_dtype()
    generator = torch.Generator().manual_seed(0)
    fits = {"mean": True, "sum": True}
    with torch.no_grad():
        for _ in range(2):
            o = torch.randn(shape, generator=generator, dtype=dtype).to(y.device)
            whole = loss(o, y)
            pieces = [(b - a, loss(o.narrow(dim, a, b - a), y.narrow(dim, a, b - a)))
                      for a, b in map(emission.span, range(1, len(emission.steps) + 1))]
            for kind, total in (("mean", sum(n / length * p for n, p in pieces)), ("sum", sum(p for _, p in pieces))):
                fits[kind] &= bool(torch.isclose(whole, torch.as_tensor(total), rtol=1e-4, atol=1e-6))
    if fits["mean"]:
        return "mean"
    if fits["sum"]:
        return "sum"
    raise TrainingError(
        "the task loss does not decompose over time steps: on a random output it is neither the mean nor "
        "the sum of its values on each chunk's steps, so no chunk can train on the steps it emits",
        node="loss", remedy="use a loss that averages (or sums) a per-step loss over every step, e.g. "
        "cross_entropy(output.flatten(0, 1), target.flatten()), or read only the last step (out[:, -1])")


def consistency(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``‖C_v(h_a) − sg(h_b)‖² / σ²`` with σ² = 1, averaged over elements."""
    return F.mse_loss(prediction, target.detach())


def coupler_loss(
    units: Units, node: int, path: Sequence[int], h_a: torch.Tensor, target: torch.Tensor,
    y: torch.Tensor, env: Env,
) -> torch.Tensor:
    """Consistency to ``target`` plus the path loss, weighted by ``config.consistency_weight`` and
    ``config.coupler_path_weight``."""
    prediction = units.run_coupler(node, h_a, env)
    loss = units.config.consistency_weight * consistency(prediction, target)
    if units.config.coupler_path_weight:
        loss = loss + units.config.coupler_path_weight * path_loss(units, path, prediction, y, env)
    return loss


def head_loss(units: Units, i: int, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``ℓ(c_i(h_i), y)`` for the local head at boundary i."""
    return units.score(units.heads[str(i)](h), y)


def block_loss(units: Units, task: Task, out: torch.Tensor, y: torch.Tensor, env: Env) -> LocalLoss:
    """A ``BLOCK_UPDATE``'s losses given block i's output ``out``: the path loss, plus
    ``config.head_weight`` times its fused head's loss when ``task.head`` is set. With an emission (no
    heads) it adds the share of the steps block i emitted, which alone is the task loss it reports."""
    loss = path_loss(units, task.path, out, y, env)
    if units.emission is not None:  # it reports the share of its own steps
        own = emitted_loss(units, units.emitted(task.unit.id, env), y, units.emission.span(task.unit.id))
        return LocalLoss(own, own + loss)
    if task.head is None:
        return LocalLoss(loss, loss)
    return LocalLoss(loss, loss + units.config.head_weight * head_loss(units, task.unit.id, out, y))


def update_loss(
    units: Units, task: Task, h: torch.Tensor, y: torch.Tensor, env: Env, *, target: torch.Tensor | None = None
) -> tuple[LocalLoss, torch.Tensor]:
    """The local objective of an update task on its (detached) input ``h``, and the unit's output.

    - ``BLOCK_UPDATE``: :func:`block_loss` of ``f_i(h)``; the output is ``f_i(h)``;
    - ``HEAD_UPDATE`` (DGL): :func:`head_loss` of ``f_i(h)``; the output is ``f_i(h)``;
    - ``COUPLER_UPDATE``: :func:`coupler_loss` towards ``target`` (the span's fine estimate); the
      output is ``target``.
    """
    i = task.unit.id
    if task.kind is TaskKind.BLOCK_UPDATE:
        out = units.run_block(i, h, env)
        return block_loss(units, task, out, y, env), out
    if task.kind is TaskKind.HEAD_UPDATE:
        out = units.run_block(i, h, env)
        loss = head_loss(units, i, out, y)
        return LocalLoss(loss, loss), out
    if task.kind is TaskKind.COUPLER_UPDATE:
        if target is None:
            raise ValueError("a coupler update needs the target boundary")
        loss = coupler_loss(units, i, task.path, h, target, y, env)
        return LocalLoss(loss, loss), target
    raise ValueError(f"{task.kind} is not an update task")


def trainable(units: Units, task: Task) -> list[nn.Parameter]:
    """The parameters an update task's backward reaches: block i (and its head for a fused head or a DGL
    head update), or coupler v."""
    i = task.unit.id
    if task.kind is TaskKind.COUPLER_UPDATE:
        return list(units.couplers[str(i)].parameters())
    params = list(units.blocks[i - 1].parameters())
    if task.head is not None or task.kind is TaskKind.HEAD_UPDATE:
        params += list(units.heads[str(i)].parameters())
    return params
