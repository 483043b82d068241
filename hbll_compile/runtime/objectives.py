"""The local losses of DESIGN §2. Each returns a scalar whose backward is taken inside one unit only.

- :func:`path_loss`: the task loss of ``h`` sent through the hierarchical path P(i -> N);
- :func:`coupler_loss`: a coupler's consistency term plus its own path loss;
- :func:`head_loss`: a local head's task loss.

The path's own modules are applied *frozen* (see ``Units.run_node``), so a loss reaches only the
unit that computed ``h``.

Example:
    >>> import torch
    >>> from hbll_compile.runtime.objectives import consistency
    >>> consistency(torch.ones(2, 3), torch.zeros(2, 3)).item()
    1.0
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from hbll_compile.config import HBLLConfig
from hbll_compile.ir import BlockSpec, Tree

Env = dict[str, Any]


class Units(Protocol):
    """What the runtime needs of a compiled model (``HBLLModel`` implements it)."""

    tree: Tree
    config: HBLLConfig
    blocks: nn.ModuleList
    specs: list[BlockSpec]
    couplers: nn.ModuleDict
    heads: nn.ModuleDict
    task_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    def environment(self, *inputs: torch.Tensor) -> Env: ...

    def run_block(self, i: int, h: torch.Tensor, env: Env) -> torch.Tensor: ...

    def run_coupler(self, node: int, h: torch.Tensor, env: Env) -> torch.Tensor: ...

    def run_node(self, node: int, h: torch.Tensor, env: Env) -> torch.Tensor: ...


def path_loss(units: Units, path: Sequence[int], h: torch.Tensor, y: torch.Tensor, env: Env) -> torch.Tensor:
    """``ℓ(P(h), y)``: the task loss after the tree nodes of ``path`` (empty for block N)."""
    for node in path:
        h = units.run_node(node, h, env)
    return units.task_loss(h, y)


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
    return units.task_loss(units.heads[str(i)](h), y)
