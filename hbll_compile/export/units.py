"""The trainable units of a compiled model and their local objectives as modules, for export.

A unit is one update task of the model's schedule (:mod:`hbll_compile.runtime.schedule`): a block
(with its fused local head, or under DGL trained by its head alone) or a coupler. Its objective is
:func:`hbll_compile.runtime.objectives.update_loss`, the very function the executor runs, wrapped in
:class:`UnitObjective` so an exporter can trace it.

Example:
    >>> import torch, hbll_compile as hc
    >>> net = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(4)])
    >>> m = hc.hbll_compile(net, (torch.randn(2, 4),), blocks=4, loss=torch.nn.functional.mse_loss)
    >>> [u.name for u in training_units(m)]
    ['block1', 'block2', 'block3', 'block4', 'coupler0', 'coupler1', 'coupler4']
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hbll_compile.errors import ExportError
from hbll_compile.model import HBLLModel
from hbll_compile.runtime.objectives import trainable, update_loss
from hbll_compile.runtime.schedule import Task, TaskKind

__all__ = ["TrainingUnit", "UnitObjective", "chain_boundaries", "guess_target", "training_units", "unit_example"]

_UPDATES = (TaskKind.BLOCK_UPDATE, TaskKind.HEAD_UPDATE, TaskKind.COUPLER_UPDATE)


@dataclass
class TrainingUnit:
    """One trainable unit and the graph of its local objective.

    Attributes:
        name: directory name: ``block3``, ``coupler0``.
        kind: ``"block"`` or ``"coupler"``.
        index: block index or tree node id.
        loss: the objective, in words.
        path: tree node ids the loss goes through (frozen).
        boundary: index of the boundary ``h`` it reads.
        target_boundary: for couplers, the boundary index of ``target``.
        needs_inputs: whether the graph also reads the model inputs (its blocks read context values).
        trainable: the parameters its optimizer updates.
    """

    name: str
    kind: str
    index: int
    loss: str
    path: tuple[int, ...]
    boundary: int
    task: Task = field(repr=False)
    """The schedule's update task this unit is."""
    target_boundary: int | None = None
    needs_inputs: bool = False
    needs_y: bool = True
    trainable: list[nn.Parameter] = field(default_factory=list, repr=False)

    def input_names(self, model_inputs: Sequence[str]) -> list[str]:
        """ONNX input names, in call order (the target last, or ``target, y`` for path-trained couplers).
        Model inputs called ``h``, ``target`` or ``y`` are renamed ``input_h`` and so on."""
        model_inputs = [f"input_{n}" if n in ("h", "target", "y") else n for n in model_inputs]
        names = list(model_inputs) if self.boundary == 0 and self.needs_inputs else []
        if not names:
            names = [model_inputs[0] if self.boundary == 0 else "h"]
            if self.needs_inputs:
                names += list(model_inputs)
        names.append("target")
        if self.kind == "coupler" and self.needs_y:
            names.append("y")
        return names


def training_units(m: HBLLModel) -> list[TrainingUnit]:
    """One unit per update task of ``m.schedule``, in block then coupler order: exactly what the executor
    trains, with the same objective (:func:`~hbll_compile.runtime.objectives.update_loss`).

    Raises:
        ExportError: the schedule has no update task (``objective="bp"``).
    """
    n = len(m.blocks)
    config = m.config
    tasks = [t for t in m.schedule.tasks() if t.kind in _UPDATES]
    if not tasks:
        raise ExportError(f"objective {config.objective!r} has no local objectives: blocks cannot train "
                          "independently", node="config.objective",
                          remedy="compile with HBLLConfig(objective='hbll') or 'dgl'")
    units: list[TrainingUnit] = []
    for task in sorted(tasks, key=lambda t: (t.kind is TaskKind.COUPLER_UPDATE, t.unit.id)):
        i = task.unit.id
        if task.kind is TaskKind.HEAD_UPDATE:
            unit = TrainingUnit(f"block{i}", "block", i, f"task_loss(c_{i}(f_{i}(h_{i - 1})), y)", (), i - 1,
                                task=task)
            blocks = {i}
        elif task.kind is TaskKind.BLOCK_UPDATE:
            text = f"task_loss(P({i}->{n})(f_{i}(h_{i - 1})), y)" if task.path else f"task_loss(f_{n}(h_{n - 1}), y)"
            if task.head is not None:
                text += f" + {config.head_weight:g} * task_loss(c_{i}(f_{i}(h_{i - 1})), y)"
            unit = TrainingUnit(f"block{i}", "block", i, text + "; path nodes frozen", task.path, i - 1, task=task)
            blocks = {i} | _path_blocks(m, task.path)
        else:
            a, b = m.coupler_plan(i).span
            with_path = bool(config.coupler_path_weight) and bool(task.path)
            weight = "" if config.consistency_weight == 1 else f"{config.consistency_weight:g} * "
            text = f"{weight}mse(C_{i}(h_{a}), h_{b})"
            if with_path:
                text += f" + {config.coupler_path_weight:g} * task_loss(P({b}->{n})(C_{i}(h_{a})), y)"
            unit = TrainingUnit(f"coupler{i}", "coupler", i, text, task.path if with_path else (), a,
                                target_boundary=b, needs_y=with_path, task=task)
            blocks = _coupler_blocks(m, i) | (_path_blocks(m, task.path) if with_path else set())
        unit.trainable = trainable(m, task)
        unit.needs_inputs = _reads_context(m, blocks)
        units.append(unit)
    return units


def _coupler_blocks(m: HBLLModel, node: int) -> set[int]:
    plan = m.coupler_plan(node)
    out = set(range(plan.span[0] + 1, plan.source + 1))
    if plan.runs_tail:
        out.add(plan.span[1])  # the tail is part of block N and reads a subset of its context
    return out


def _path_blocks(m: HBLLModel, path: Sequence[int]) -> set[int]:
    out: set[int] = set()
    for node in path:
        tree_node = m.tree.nodes[node]
        out |= {tree_node.span[1]} if tree_node.is_leaf else _coupler_blocks(m, node)
    return out


def _reads_context(m: HBLLModel, blocks: set[int]) -> bool:
    return any(m.specs[j - 1].context for j in blocks)


class UnitObjective(nn.Module):
    """A unit's local objective as a module: ``forward(*inputs) -> loss`` with inputs as
    :meth:`TrainingUnit.input_names` lists them. Its parameters are ``m``'s (``m`` is its submodule)."""

    def __init__(self, m: HBLLModel, unit: TrainingUnit) -> None:
        super().__init__()
        self.m = m
        self.unit = unit

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        m, unit = self.m, self.unit
        values = list(args)
        y = values.pop() if unit.kind == "coupler" and unit.needs_y else None
        target = values.pop()
        n_inputs = len(m.input_names)
        env: dict[str, Any] = {}
        if unit.needs_inputs:
            env = m.environment(*(values[:n_inputs] if unit.boundary == 0 else values[1:1 + n_inputs]))
        if unit.kind == "coupler":  # target is h_b; y only feeds the (optional) path term
            loss, _ = update_loss(m, unit.task, values[0], target if y is None else y, env, target=target)
        else:
            loss, _ = update_loss(m, unit.task, values[0], target, env)
        return loss.total


def guess_target(m: HBLLModel, output: torch.Tensor) -> torch.Tensor:
    """A target the task loss accepts for ``output``: class ids per row, per position, or a tensor like
    the output (tried in that order)."""
    batch = output.shape[0]
    candidates = [
        torch.zeros(batch, dtype=torch.long, device=output.device),
        torch.zeros(output.shape[:-1], dtype=torch.long, device=output.device),
        torch.zeros_like(output),
    ]
    for candidate in candidates:
        try:
            with torch.no_grad():
                value = m.score(output, candidate)
        except Exception:  # noqa: BLE001 - probing which target layout the loss accepts
            continue
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            return candidate
    raise ExportError("cannot guess a target the task loss accepts", node="loss",
                      remedy="pass example_target=... to export_training_artifacts")


def unit_example(
    m: HBLLModel, unit: TrainingUnit, inputs: Sequence[torch.Tensor], target: torch.Tensor,
    boundaries: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, ...]:
    """Example arguments for ``UnitObjective(m, unit)`` from model inputs, the task target and the
    boundaries ``h_0..h_N`` of those inputs."""
    args: list[torch.Tensor] = []
    if unit.boundary == 0 and unit.needs_inputs:
        args += list(inputs)
    else:
        args.append(boundaries[unit.boundary])
        if unit.needs_inputs:
            args += list(inputs)
    args.append(boundaries[unit.target_boundary] if unit.target_boundary is not None else target)
    if unit.kind == "coupler" and unit.needs_y:
        args.append(target)
    return tuple(args)


def chain_boundaries(m: HBLLModel, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``[h_0, ..., h_N]`` of the exact chain on ``inputs`` (eval mode, no gradients)."""
    with m.exporting(), torch.no_grad():
        env = m.environment(*inputs)
        hs = [inputs[0]]
        for i in range(1, len(m.blocks) + 1):
            hs.append(m.run_block(i, hs[-1], env))
    return hs
