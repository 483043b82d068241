"""HBLLModel: the compiled model. It owns no copy of the user's weights; its blocks share them.

Example:
    >>> import torch, hbll_compile as hc
    >>> net = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(4)])
    >>> m = hc.hbll_compile(net, (torch.randn(2, 8),), blocks=4)
    >>> x = torch.randn(3, 8)
    >>> torch.equal(m(x), net(x)), m.to_original() is net, m.tree.depth
    (True, True, 2)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hbll_compile.config import HBLLConfig
from hbll_compile.ir import BlockSpec, Boundary, Tree
from hbll_compile.passes.lower import Lowered, bind_state


class HBLLModel(nn.Module):
    """A model cut into ``blocks`` arranged in a balanced binary ``tree``.

    ``forward(*inputs)`` runs the exact chain of blocks and equals the original model.
    Parameters and buffers are the user's own objects: training the compiled model trains the
    original, which :meth:`to_original` returns.
    """

    def __init__(
        self,
        model: nn.Module,
        lowered: Lowered,
        tree: Tree,
        *,
        loss: Callable[..., torch.Tensor] | None = None,
        config: HBLLConfig | None = None,
        report: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        object.__setattr__(self, "_model", model)  # not a submodule: the blocks already expose its state
        self.context = lowered.context
        self.blocks = nn.ModuleList(lowered.blocks)
        self.constants = nn.Module()
        self._constant_names: dict[str, str] = {}
        for i, (target, tensor) in enumerate(lowered.constants.items()):
            self.constants.register_buffer(f"c{i}", tensor)
            self._constant_names[target] = f"c{i}"
        self.tree = tree
        self.specs: list[BlockSpec] = lowered.specs
        self.boundaries: list[Boundary] = lowered.boundaries
        self.input_names = lowered.input_names
        self.context_names = lowered.context_names
        self.loss = loss
        self.config = config or HBLLConfig()
        self.report = report or {}
        self.train(model.training)

    # -- state sharing -------------------------------------------------------------------------
    def _resolve(self, target: str) -> object:
        if target in self._constant_names:
            return getattr(self.constants, self._constant_names[target])
        owner: object = self._model
        for part in target.split("."):
            owner = getattr(owner, part)
        return owner

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> HBLLModel:
        """Convert the user's model once, then re-point the blocks at its (possibly new) tensors."""
        self._model._apply(fn)
        for name, child in self.named_children():
            if name not in ("blocks", "context"):
                child._apply(fn)
        for module in (self.context, *self.blocks):
            bind_state(module, self._resolve)
        return self

    def train(self, mode: bool = True) -> HBLLModel:
        self._model.train(mode)
        return super().train(mode)

    def to_original(self) -> nn.Module:
        """The user's model object, holding every trained parameter and buffer."""
        return self._model

    # -- inference -----------------------------------------------------------------------------
    def environment(self, *inputs: torch.Tensor) -> dict[str, Any]:
        """Model inputs and context values by name: what blocks read besides their boundary."""
        env: dict[str, Any] = dict(zip(self.input_names, inputs))
        env.update(zip(self.context_names, self.context(*inputs)))
        return env

    def run_block(self, i: int, h: torch.Tensor, env: dict[str, Any]) -> torch.Tensor:
        """Block i (1-based) on boundary ``h_{i-1}``."""
        return self.blocks[i - 1](h, *(env[name] for name in self.specs[i - 1].context))

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(self.input_names):
            raise TypeError(f"expected {len(self.input_names)} inputs ({', '.join(self.input_names)}), "
                            f"got {len(inputs)}")
        env = self.environment(*inputs)
        h = inputs[0]
        for i in range(1, len(self.blocks) + 1):
            h = self.run_block(i, h, env)
        return h

    # -- inspection ----------------------------------------------------------------------------
    def describe(self) -> str:
        """A table: block, span of graph nodes, FLOPs, parameters, boundary shape, tree level."""
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"HBLL blocks: N={len(self.blocks)}, tree depth {self.tree.depth}")
        for column in ("block", "span", "FLOPs", "params", "boundary out", "tree level"):
            table.add_column(column, justify="right" if column in ("FLOPs", "params") else "left")
        level = {leaf.span[1]: leaf.depth for leaf in self.tree.leaves}
        for spec, boundary in zip(self.specs, self.boundaries[1:]):
            span = spec.nodes[0] if len(spec.nodes) == 1 else f"{spec.nodes[0]} .. {spec.nodes[-1]}"
            table.add_row(str(spec.index), span, f"{spec.flops:,}", f"{spec.param_count:,}",
                          "B×" + "×".join(map(str, boundary.shape)), str(level[spec.index]))
        console = Console(width=140, record=True, file=_Null())
        console.print(table)
        return console.export_text()

    def __repr__(self) -> str:
        return f"HBLLModel(blocks={len(self.blocks)}, depth={self.tree.depth}, model={type(self._model).__name__})"


class _Null:
    def write(self, _: str) -> int:
        return 0

    def flush(self) -> None:
        pass
