"""The local losses of DESIGN §2, written once: every executor and the onnxruntime-training export call
:func:`update_loss` for an update task and backward into :func:`trainable` of that task.

- :func:`path_loss`: the task loss of ``h`` sent through the hierarchical path P(i -> N);
- :func:`block_loss`: a block update's path loss, plus its fused local head's weighted loss;
- :func:`coupler_loss`: a coupler's consistency term plus its own path loss;
- :func:`head_loss`: a local head's task loss.

The path's own modules are applied *frozen* (see ``Units.run_node``), so a loss reaches only the
unit that computed ``h``.

Example:
    >>> import torch
    >>> consistency(torch.ones(2, 3), torch.zeros(2, 3)).item()
    1.0
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from hbll_compile.config import HBLLConfig
from hbll_compile.ir import BlockSpec, Tree
from hbll_compile.runtime.schedule import Task, TaskKind

__all__ = [
    "Env",
    "LocalLoss",
    "Units",
    "block_loss",
    "consistency",
    "coupler_loss",
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

    def environment(self, *inputs: torch.Tensor, target: torch.Tensor | None = None) -> Env: ...

    def run_block(self, i: int, h: torch.Tensor, env: Env) -> torch.Tensor: ...

    def run_coupler(self, node: int, h: torch.Tensor, env: Env) -> torch.Tensor: ...

    def run_node(self, node: int, h: torch.Tensor, env: Env) -> torch.Tensor: ...

    def score(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor: ...


class LocalLoss(NamedTuple):
    """``task``: the task loss an update reports; ``total``: what its backward runs on (it adds a fused
    head's weighted loss, or is the coupler's whole objective)."""

    task: torch.Tensor
    total: torch.Tensor


def path_loss(units: Units, path: Sequence[int], h: torch.Tensor, y: torch.Tensor, env: Env) -> torch.Tensor:
    """``ℓ(P(h), y)``: the task loss after the tree nodes of ``path`` (empty for block N)."""
    for node in path:
        h = units.run_node(node, h, env)
    return units.score(h, y)


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
    ``config.head_weight`` times its fused head's loss when ``task.head`` is set."""
    loss = path_loss(units, task.path, out, y, env)
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
