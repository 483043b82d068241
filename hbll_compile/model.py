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

import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from hbll_compile.config import HBLLConfig
from hbll_compile.errors import TrainingError
from hbll_compile.ir import BlockSpec, Boundary, Tail, Tree
from hbll_compile.passes.couplers import CouplerPlan
from hbll_compile.passes.graph import lookup
from hbll_compile.passes.lower import Lowered, bind_state
from hbll_compile.runtime.batching import blocks_sharing_parameters
from hbll_compile.runtime.executor import Executor
from hbll_compile.runtime.fidelity import GradientReport, gradient_report
from hbll_compile.runtime.schedule import Schedule
from hbll_compile.runtime.trainer import evaluate, fit


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
        couplers: nn.ModuleDict,
        coupler_plans: list[CouplerPlan],
        heads: nn.ModuleDict,
        schedule: Schedule,
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
        object.__setattr__(self, "tail", lowered.tail)  # not a submodule: block N already owns its state
        self.tail_info: Tail = lowered.tail_info
        self.specs: list[BlockSpec] = lowered.specs
        self.boundaries: list[Boundary] = lowered.boundaries
        self.input_names = lowered.input_names
        self.context_names = lowered.context_names
        self.couplers = couplers
        self.coupler_plans = coupler_plans
        self._plan = {p.node: p for p in coupler_plans}
        self.heads = heads
        self.schedule = schedule
        self.task_loss = loss
        self.config = config or HBLLConfig()
        self.report = report or {}
        self._executor = Executor(schedule, self)
        self._needs_isolation = _needs_isolation(self.blocks)
        self.train(model.training)

    # -- state sharing -------------------------------------------------------------------------
    def _resolve(self, target: str) -> object:
        if target in self._constant_names:
            return getattr(self.constants, self._constant_names[target])
        return lookup(self._model, target)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> HBLLModel:
        """Convert the user's model once, then re-point the blocks at its (possibly new) tensors."""
        self._model._apply(fn)
        for name, child in self.named_children():
            if name not in ("blocks", "context"):
                child._apply(fn)
        for module in (self.context, *self.blocks, self.tail):
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

    def run_block_frozen(self, i: int, h: torch.Tensor, env: dict[str, Any]) -> torch.Tensor:
        """Block i as a fixed function: no gradient reaches its parameters and, in train mode, its
        running statistics (BatchNorm) are not updated. Used inside paths and estimates."""
        return self._run_frozen(self.blocks[i - 1], self._needs_isolation[i - 1], self.specs[i - 1], h, env)

    def run_tail(self, t: torch.Tensor, env: dict[str, Any]) -> torch.Tensor:
        """The model's output tail (see :class:`~hbll_compile.ir.Tail`) as a fixed function."""
        return self._run_frozen(self.tail, self._needs_isolation[-1], self.tail_info.spec, t, env)

    @staticmethod
    def _run_frozen(
        module: nn.Module, isolate: bool, spec: BlockSpec, h: torch.Tensor, env: dict[str, Any]
    ) -> torch.Tensor:
        args = (h, *(env[name] for name in spec.context))
        if not isolate:
            return module(*args)  # backward(inputs=...) already keeps its parameters out of the update
        state = {name: p.detach() for name, p in module.named_parameters()}
        state.update((name, b.clone()) for name, b in module.named_buffers())
        return torch.func.functional_call(module, state, args)

    def run_coupler(self, node: int, h: torch.Tensor, env: dict[str, Any]) -> torch.Tensor:
        """Coupler of tree node ``node`` on its span's left boundary: block 1 first for token inputs,
        the output tail last for spans that end at the output (see :mod:`hbll_compile.passes.couplers`)."""
        plan = self._plan[node]
        if plan.source != plan.span[0]:
            h = self.run_block_frozen(1, h, env)
        h = self.couplers[str(node)](h)
        if plan.runs_tail:
            h = self.run_tail(h, env)
        return h

    def run_node(self, node: int, h: torch.Tensor, env: dict[str, Any]) -> torch.Tensor:
        """A tree node as a fixed map: its coupler, or its block (frozen) for a leaf."""
        tree_node = self.tree.nodes[node]
        if tree_node.is_leaf:
            return self.run_block_frozen(tree_node.span[1], h, env)
        return self.run_coupler(node, h, env)

    def forward(self, *inputs: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """The exact chain of blocks, or with ``depth=d`` the depth-d subnetwork (couplers and blocks)."""
        if len(inputs) != len(self.input_names):
            raise TypeError(f"expected {len(self.input_names)} inputs ({', '.join(self.input_names)}), "
                            f"got {len(inputs)}")
        env = self.environment(*inputs)
        h = inputs[0]
        if depth is None or depth >= self.tree.depth:
            for i in range(1, len(self.blocks) + 1):
                h = self.run_block(i, h, env)
            return h
        if depth < 0:
            raise ValueError(f"depth must be in 0..{self.tree.depth}, got {depth}")
        for node in self.tree.nodes_at_depth(depth):
            h = self.run_block(node.span[1], h, env) if node.is_leaf else self.run_coupler(node.id, h, env)
        return h

    # -- training ------------------------------------------------------------------------------
    def training_step(self, *inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """One step of the configured objective: fills ``.grad`` of blocks, couplers and heads by their
        local losses only; call ``optimizer.step()`` afterwards. Returns the task loss of the deepest
        block that ran (with ``inputs="wavefront"``, on the batch that entered N-1 steps ago)."""
        if self.task_loss is None:
            raise TrainingError("no task loss was given", node="loss",
                                remedy="compile with hbll_compile(..., loss=torch.nn.functional.cross_entropy)")
        return self._executor.step(inputs, target)

    def reset_pipeline(self) -> None:
        """Drop the activations the wavefront pipeline carries between steps."""
        self._executor.reset()

    def fit(
        self,
        train_loader: Iterable[Sequence[torch.Tensor]],
        epochs: int,
        optimizer: torch.optim.Optimizer | None = None,
        eval_loader: Iterable[Sequence[torch.Tensor]] | None = None,
        *,
        progress: bool = True,
        diagnose_every: int | None = None,
        diagnose_batch: Sequence[torch.Tensor] | None = None,
    ) -> dict[str, list[Any]]:
        """Train for ``epochs`` on batches ``(inputs..., target)`` with a rich progress bar (loss,
        steps/s, stage count); default optimizer AdamW(lr=1e-3). Returns the per-epoch history;
        ``diagnose_every=k`` adds ``history["gradient_report"]``, the :meth:`gradient_report` summary
        every k steps on one fixed batch (``diagnose_batch``, else the first training batch)."""
        return fit(self, train_loader, epochs, optimizer, eval_loader, progress=progress,
                   diagnose_every=diagnose_every, diagnose_batch=diagnose_batch)

    def depth_flops(self, depth: int | None) -> int:
        """Per-sample FLOPs of ``self(x, depth=depth)`` (the exact chain for ``None``)."""
        per_block = [spec.flops / self.report["example_batch"] for spec in self.specs]
        if depth is None or depth >= self.tree.depth:
            return int(sum(per_block))
        total = 0.0
        for node in self.tree.nodes_at_depth(depth):
            if node.is_leaf:
                total += per_block[node.span[1] - 1]
            else:
                plan = self._plan[node.id]
                total += plan.flops + (per_block[0] if plan.source != plan.span[0] else 0)
                total += self.tail_info.spec.flops / self.report["example_batch"] if plan.runs_tail else 0
        return int(total)

    def depth_report(self, loader: Iterable[Sequence[torch.Tensor]]) -> list[dict[str, float]]:
        """Accuracy, loss and per-sample FLOPs of every depth-d subnetwork, d = 0..tree depth
        (the last row is the exact chain)."""
        rows = []
        for d in range(self.tree.depth + 1):
            metrics = evaluate(self, loader, depth=d)
            rows.append({"depth": d, "flops": self.depth_flops(d), **metrics})
        return rows

    def gradient_report(
        self, *inputs: torch.Tensor, target: torch.Tensor, paths: str = "couplers", probes: int = 4, seed: int = 0
    ) -> GradientReport:
        """The gradient-fidelity instrument on one batch at the current weights: per block, the cosine
        and norm ratio of its local gradient against its BP gradient; per coupler, its consistency
        error and VJP alignment with its exact span. ``paths="exact"`` swaps couplers for exact spans
        (then cosines are 1: the self-check). Changes no weight, gradient, buffer, RNG or pipeline
        state. See :mod:`hbll_compile.runtime.fidelity`."""
        return gradient_report(self, inputs, target, paths=paths, probes=probes, seed=seed)

    # -- persistence ---------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Write every parameter and buffer (model, couplers, heads) and the compile settings to a
        safetensors file; :meth:`load` rebuilds the compiled model from it."""
        from safetensors.torch import save_model

        settings = {"blocks": len(self.blocks), "config": self.config.to_dict(),
                    "example_inputs": self.report["example_inputs"]}
        save_model(self, path, metadata={"hbll": json.dumps(settings)})

    @classmethod
    def load(
        cls, path: str, model_factory: Callable[[], nn.Module], *, loss: Callable[..., torch.Tensor] | None = None
    ) -> HBLLModel:
        """Recompile ``model_factory()`` as it was saved and load the saved state into it."""
        from hbll_compile.api import load  # the api layer owns compiling; this is its public alias

        return load(path, model_factory, loss=loss)

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


def _needs_isolation(blocks: nn.ModuleList) -> list[bool]:
    """Blocks that must run on detached copies of their state when used as a fixed map: those with
    buffers (BatchNorm statistics must not move) or with a tied parameter (a tied weight would otherwise
    collect gradient through another unit's path)."""
    tied = blocks_sharing_parameters(blocks)
    return [i in tied or any(True for _ in block.buffers()) for i, block in enumerate(blocks, 1)]
