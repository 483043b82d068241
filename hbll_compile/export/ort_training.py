"""Per-unit onnxruntime-training artifacts: every block, coupler and head of a compiled model as its own
training graph on its local objective (DESIGN §2, step 3), and :class:`BlockTrainer`, which trains one.

HBLL trains each unit on a loss that needs only the unit's input and target tensors, so each unit is an
independent training problem that can run where PyTorch does not: on a phone, in a browser, on
another machine. :func:`export_training_artifacts` writes one directory per unit::

    out_dir/manifest.json               every unit: kind, inputs, target, loss, trainable parameters
    out_dir/block3/training_model.onnx  forward, local loss and gradient graph
    out_dir/block3/eval_model.onnx      forward and local loss (Dropout off, BatchNorm on running stats)
    out_dir/block3/optimizer_model.onnx AdamW
    out_dir/block3/checkpoint           the trainable parameters (and optimizer state)
    out_dir/block3/unit.json            this unit's entry of manifest.json

Units and their graphs (inputs in order; ``y`` is the task target, ``ℓ`` the compiled task loss):

- ``block{i}``: ``ℓ(P(i→N)(f_i(h_{i-1})), y)`` with the path's tree nodes frozen; inputs ``h`` (the
  boundary h_{i-1}; for block 1 the model inputs themselves), the model inputs when the unit's blocks
  read context values (masks, positions and sequence lengths are recomputed inside the graph, so
  shapes stay dynamic), then ``target`` (y). Trains block i (plus its local head, weighted by
  ``local_head_weight``, when the config has heads). Under ``objective="dgl"`` blocks 1..N-1 train on
  their head's loss instead.
- ``coupler{v}``: ``consistency_weight · mse(C_v(h_a), h_b)`` (+ ``coupler_path_weight`` times the task
  loss through its path); inputs ``h`` (h_a), model inputs if needed, ``target`` (h_b), and ``y`` when
  the path term is on. Trains C_v.
- ``head{i}``: ``ℓ(c_i(h_i), y)``; inputs ``h`` (h_i) and ``target``. Trains c_i.

onnxruntime-training is the last release of the ORT training API (1.19.2, Python ≤ 3.11); it reads ONNX
IR version ≤ 10, so every file written here is lowered to IR 10 (newer ``onnx`` writes IR 11+) and to
an opset it supports (20 by default). It installs the same ``onnxruntime`` Python module as the
inference package, so keep it in its own environment: ``pip install 'hbll-compile[ort-training]'``.

BatchNorm: the training graph normalises with batch statistics, as torch's train mode does, but the
running statistics are graph constants (ORT training has no buffer updates); re-estimate them in torch
before evaluating in eval mode, or evaluate with batch statistics.

Example (needs onnxruntime-training):
    >>> import torch, hbll_compile as hc                                        # doctest: +SKIP
    >>> m = hc.hbll_compile(net, (x,), blocks=4, loss=torch.nn.functional.cross_entropy)  # doctest: +SKIP
    >>> hc.export_training_artifacts(m, "artifacts")                            # doctest: +SKIP
    >>> trainer = hc.ort.BlockTrainer("artifacts/block2")                       # doctest: +SKIP
    >>> loss = trainer.step(h1, target=y)                                       # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hbll_compile.errors import ExportError
from hbll_compile.export.onnx import _first_line, _quiet, default_inputs, inference_mode, require
from hbll_compile.model import HBLLModel
from hbll_compile.runtime.objectives import coupler_loss, head_loss, path_loss

ORT_TRAINING_EXTRA = (
    "pip install 'hbll-compile[ort-training]' (onnxruntime-training 1.19.2, Python <= 3.11) in an environment of "
    "its own: it replaces the 'onnxruntime' module of the inference package"
)
MAX_IR_VERSION = 10
"""Highest ONNX IR version onnxruntime-training 1.19.2 reads."""
MAX_OPSET = 21
"""Highest default-domain opset onnxruntime-training 1.19.2 runs."""
DEFAULT_OPSET = 20
FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")


@dataclass
class TrainingUnit:
    """One trainable unit and the graph of its local objective.

    Attributes:
        name: directory name: ``block3``, ``coupler0``, ``head2``.
        kind: ``"block"``, ``"coupler"`` or ``"head"``.
        index: block index, tree node id or boundary index.
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
    target_boundary: int | None = None
    needs_inputs: bool = False
    needs_y: bool = True
    head_weight: float = 0.0
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
    """The units of ``m`` and their objectives, following ``m.config`` (as the executor trains them)."""
    config = m.config
    if config.objective == "bp":
        raise ExportError("objective 'bp' has no local objectives: blocks cannot train independently",
                          node="config.objective", remedy="compile with HBLLConfig(objective='hbll') or 'dgl'")
    n = len(m.blocks)
    units: list[TrainingUnit] = []
    for i in range(1, n + 1):
        head = str(i) in m.heads
        if config.objective == "dgl" and i < n:
            unit = TrainingUnit(f"block{i}", "block", i, f"task_loss(c_{i}(f_{i}(h_{i - 1})), y)", (), i - 1,
                                head_weight=1.0)
            unit.trainable = [*m.blocks[i - 1].parameters(), *m.heads[str(i)].parameters()]
            blocks = {i}
        else:
            path = tuple(node.id for node in m.tree.path(i))
            text = f"task_loss(P({i}->{n})(f_{i}(h_{i - 1})), y)" if path else f"task_loss(f_{n}(h_{n - 1}), y)"
            weight = config.local_head_weight if head and config.objective == "hbll" else 0.0
            if weight:
                text += f" + {weight:g} * task_loss(c_{i}(f_{i}(h_{i - 1})), y)"
            unit = TrainingUnit(f"block{i}", "block", i, text + "; path nodes frozen", path, i - 1,
                                head_weight=weight)
            unit.trainable = list(m.blocks[i - 1].parameters())
            if weight:
                unit.trainable += list(m.heads[str(i)].parameters())
            blocks = {i} | _path_blocks(m, path)
        unit.needs_inputs = _reads_context(m, blocks)
        units.append(unit)
    for plan in m.coupler_plans if config.objective == "hbll" else ():  # DGL does not train couplers
        a, b = plan.span
        path = tuple(node.id for node in m.tree.path(b))
        with_path = bool(config.coupler_path_weight) and bool(path)
        weight = "" if config.consistency_weight == 1 else f"{config.consistency_weight:g} * "
        text = f"{weight}mse(C_{plan.node}(h_{a}), h_{b})"
        if with_path:
            text += f" + {config.coupler_path_weight:g} * task_loss(P({b}->{n})(C_{plan.node}(h_{a})), y)"
        unit = TrainingUnit(f"coupler{plan.node}", "coupler", plan.node, text, path if with_path else (), a,
                            target_boundary=b, needs_y=with_path)
        unit.trainable = list(m.couplers[str(plan.node)].parameters())
        blocks = _coupler_blocks(m, plan.node) | (_path_blocks(m, path) if with_path else set())
        unit.needs_inputs = _reads_context(m, blocks)
        units.append(unit)
    for key in m.heads:
        i = int(key)
        unit = TrainingUnit(f"head{i}", "head", i, f"task_loss(c_{i}(h_{i}), y)", (), i)
        unit.trainable = list(m.heads[key].parameters())
        units.append(unit)
    return units


def _coupler_blocks(m: HBLLModel, node: int) -> set[int]:
    plan = m._plan[node]
    out = set()
    if plan.source != plan.span[0]:
        out.add(1)
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
        args = list(args)
        y = args.pop() if unit.kind == "coupler" and unit.needs_y else None
        target = args.pop()
        n_inputs = len(m.input_names)
        if unit.needs_inputs:
            inputs = args[:n_inputs] if unit.boundary == 0 else args[1:1 + n_inputs]
            env = m.environment(*inputs)
        else:
            env = {}
        h = args[0]
        if unit.kind == "block":
            out = m.run_block(unit.index, h, env)
            if m.config.objective == "dgl" and unit.index < len(m.blocks):
                return head_loss(m, unit.index, out, target)
            loss = path_loss(m, unit.path, out, target, env)
            if unit.head_weight:
                loss = loss + unit.head_weight * head_loss(m, unit.index, out, target)
            return loss
        if unit.kind == "coupler":
            return coupler_loss(m, unit.index, unit.path, h, target, y if y is not None else target, env)
        return head_loss(m, unit.index, h, target)


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
                value = m.task_loss(output, candidate)
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
    args.append(boundaries[unit.target_boundary] if unit.kind == "coupler" else target)
    if unit.kind == "coupler" and unit.needs_y:
        args.append(target)
    return tuple(args)


def chain_boundaries(m: HBLLModel, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``[h_0, ..., h_N]`` of the exact chain on ``inputs`` (eval mode, no gradients)."""
    with inference_mode(m), torch.no_grad():
        env = m.environment(*inputs)
        hs = [inputs[0]]
        for i in range(1, len(m.blocks) + 1):
            hs.append(m.run_block(i, hs[-1], env))
    return hs


def export_training_artifacts(
    m: HBLLModel,
    out_dir: str | os.PathLike[str],
    *,
    units: Sequence[str] | None = None,
    example_inputs: Sequence[torch.Tensor] | None = None,
    example_target: torch.Tensor | None = None,
    optimizer: str = "AdamW",
    lr: float = 1e-3,
    weight_decay: float | None = None,
    opset: int | None = None,
) -> dict[str, Any]:
    """Write onnxruntime-training artifacts for every unit of ``m`` (see the module docstring).

    Args:
        m: the compiled model; it needs its task loss (``hbll_compile(..., loss=...)``).
        out_dir: directory to write; one sub-directory per unit and ``manifest.json``.
        units: names of the units to write (``["block2", "coupler0"]``); default all.
        example_inputs: model inputs to trace with (default: shaped like the compile-time example).
        example_target: a task target for those inputs (default: guessed from the loss, see
            :func:`guess_target`).
        optimizer: ``"AdamW"`` (torch's defaults: betas (0.9, 0.999), eps 1e-8) or ``"SGD"`` (plain).
        lr: learning rate :class:`BlockTrainer` starts with (recorded in the manifest).
        weight_decay: AdamW's decoupled weight decay (default 0.01, as ``torch.optim.AdamW``).
        opset: ONNX opset of the graphs (default 20; at most 21).

    Returns:
        the manifest (also written to ``out_dir/manifest.json``).

    Raises:
        ExportError: onnxruntime-training is not installed (``pip install 'hbll-compile[ort-training]'``),
            the model has no task loss, or a unit's graph cannot be exported or differentiated.
    """
    require("onnx", "onnxscript")
    require("onnxruntime.training", extra=ORT_TRAINING_EXTRA)
    from onnxruntime.training import artifacts

    if m.task_loss is None:
        raise ExportError("the compiled model has no task loss", node="loss",
                          remedy="compile with hbll_compile(..., loss=torch.nn.functional.cross_entropy)")
    if optimizer not in ("AdamW", "SGD"):
        raise ExportError(f"unknown optimizer {optimizer!r}", node="optimizer", remedy="use 'AdamW' or 'SGD'")
    if optimizer == "AdamW":
        optim = {"name": "AdamW", "lr": lr, "betas": [0.9, 0.999], "eps": 1e-8,
                 "weight_decay": 0.01 if weight_decay is None else weight_decay}
    else:
        optim = {"name": "SGD", "lr": lr}
    opset = opset or DEFAULT_OPSET
    if opset > MAX_OPSET:
        raise ExportError(f"onnxruntime-training 1.19.2 runs opsets up to {MAX_OPSET}, not {opset}",
                          node="opset", remedy=f"pass opset<={MAX_OPSET}")
    all_units = training_units(m)
    if units is not None:
        known = {u.name for u in all_units}
        missing = [u for u in units if u not in known]
        if missing:
            raise ExportError(f"no such unit(s): {', '.join(missing)}", node="units",
                              remedy=f"choose from {', '.join(sorted(known))}")
        all_units = [u for u in all_units if u.name in set(units)]
    inputs = tuple(example_inputs) if example_inputs is not None else default_inputs(
        m, max(2, int(m.report.get("example_batch", 2))))
    boundaries = chain_boundaries(m, inputs)
    target = example_target if example_target is not None else guess_target(m, boundaries[-1])

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {
        "format": "hbll-ort-training/1",
        "onnxruntime_training": "1.19.2",
        "ir_version": MAX_IR_VERSION,
        "opset": opset,
        "optimizer": optim,
        "model_inputs": list(m.input_names),
        "task_loss": getattr(m.task_loss, "__name__", type(m.task_loss).__name__),
        "config": m.config.to_dict(),
        "units": {},
    }
    for unit in all_units:
        entry = _write_unit(m, unit, inputs, target, boundaries, out / unit.name, opset, optim, artifacts)
        manifest["units"][unit.name] = entry
        (out / unit.name / "unit.json").write_text(json.dumps(entry, indent=2))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def _write_unit(
    m: HBLLModel, unit: TrainingUnit, inputs: Sequence[torch.Tensor], target: torch.Tensor,
    boundaries: Sequence[torch.Tensor], directory: Path, opset: int, optim: dict[str, Any], artifacts: Any,
) -> dict[str, Any]:
    import onnx

    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    objective = UnitObjective(m, unit)
    args = unit_example(m, unit, inputs, target, boundaries)
    names = unit.input_names(m.input_names)
    forward_path = directory / "forward_model.onnx"
    batch = torch.export.Dim("batch")
    dynamic = (tuple({0: batch} if a.dim() else {} for a in args),)
    was_training = m.training
    m.train()
    try:
        with warnings.catch_warnings(), _quiet():
            warnings.simplefilter("ignore")
            torch.onnx.export(objective, args, str(forward_path), dynamo=True, input_names=names,
                              output_names=["loss"], opset_version=opset, dynamic_shapes=dynamic,
                              external_data=False, optimize=False, verbose=False)
    except Exception as err:  # noqa: BLE001
        raise ExportError(f"cannot export the objective of {unit.name}: {type(err).__name__}: {_first_line(err)}",
                          node=unit.name, remedy="make the block traceable by torch.export (non-strict)") from err
    finally:
        m.train(was_training)
    # a tied parameter has several names; the exporter names its initializer by one of them
    ids = {id(p) for p in unit.trainable if p.requires_grad}
    wanted = {name for name, p in objective.named_parameters(remove_duplicate=False) if id(p) in ids}
    model = optimize_for_training(onnx.load(str(forward_path)), wanted)
    lower_ir(model)
    add_gradient_outputs(model)
    onnx.save(model, str(forward_path))

    trainable = {t.name: t.name.removeprefix("m.") for t in model.graph.initializer if t.name in wanted}
    if not trainable:
        raise ExportError(f"{unit.name} has no trainable parameter in its graph", node=unit.name,
                          remedy=f"export the other units with units=[...] leaving out {unit.name}")
    from onnxruntime.training import onnxblock

    if optim["name"] == "AdamW":
        block = onnxblock.optim.AdamW(betas=tuple(optim["betas"]), eps=optim["eps"], weight_decay=optim["weight_decay"])
    else:
        block = onnxblock.optim.SGD()
    try:
        with _ort_quiet():
            artifacts.generate_artifacts(model, requires_grad=list(trainable), loss=None, optimizer=block,
                                         frozen_params=frozen_batchnorm(model, trainable),
                                         artifact_directory=str(directory))
    except Exception as err:  # noqa: BLE001
        raise ExportError(f"onnxruntime-training cannot build the training graph of {unit.name}: "
                          f"{type(err).__name__}: {_first_line(err)}", node=unit.name,
                          remedy="an op of this unit may have no gradient in onnxruntime-training 1.19.2; "
                          "try another opset (opset=17)") from err
    for name in FILES[:3]:
        file = directory / name
        proto = onnx.load(str(file))
        lower_ir(proto)
        onnx.save(proto, str(file))

    def describe(name: str, value: torch.Tensor, role: str) -> dict[str, Any]:
        return {"name": name, "role": role, "shape": ["batch", *value.shape[1:]] if value.dim() else [],
                "dtype": str(value.dtype).removeprefix("torch.")}

    roles = _roles(m, unit)
    n_main = len(names) - 1 - int(unit.kind == "coupler" and unit.needs_y)
    return {
        "kind": unit.kind,
        "index": unit.index,
        "loss": unit.loss,
        "path": list(unit.path),
        "inputs": [describe(n, a, r) for n, a, r in zip(names[:n_main], args, roles)],
        "target": describe("target", args[n_main],
                           f"h_{unit.target_boundary}" if unit.kind == "coupler" else "y (task target)"),
        **({"y": describe("y", args[-1], "y (task target)")} if n_main + 2 == len(names) else {}),
        "input_names": names,
        "outputs": ["loss"],
        "trainable": trainable,
        "optimizer": optim,
        "files": list(FILES),
    }


def _roles(m: HBLLModel, unit: TrainingUnit) -> list[str]:
    roles = []
    if unit.boundary == 0 and unit.needs_inputs:
        roles += [f"model input {name} (h_0)" if k == 0 else f"model input {name}"
                  for k, name in enumerate(m.input_names)]
    else:
        roles.append(f"h_{unit.boundary}")
        if unit.needs_inputs:
            roles += [f"model input {name} (for context values)" for name in m.input_names]
    return roles


def optimize_for_training(model: Any, trainable: set[str]) -> Any:
    """Simplify an unoptimised dynamo export for onnxruntime-training: fold constants and apply
    onnxscript's default rewrites (``SplitToSequence`` + ``SequenceAt`` become ``Split``, which has a
    gradient). Trainable parameters are turned into graph inputs meanwhile, so no rule treats them as
    constants (a zero-initialised bias would be dropped), and initializers are never merged (the
    exporter's own optimizer deduplicates equal tensors: two zero biases would train as one)."""
    import onnx
    import onnx_ir as ir
    import onnxscript.optimizer as optimizer

    graph = model.graph
    held = [t for t in graph.initializer if t.name in trainable]
    kept = [t for t in graph.initializer if t.name not in trainable]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in held)

    ir_model = ir.serde.deserialize_model(model)
    for _ in range(2):
        optimizer.fold_constants(ir_model)
        optimizer.remove_unused_nodes(ir_model)
    out = ir.serde.serialize_model(ir_model)

    names = {t.name for t in held}
    inputs = [i for i in out.graph.input if i.name not in names]
    del out.graph.input[:]
    out.graph.input.extend(inputs)
    out.graph.initializer.extend(held)
    return out


def frozen_batchnorm(model: Any, trainable: Sequence[str] | dict[str, str]) -> list[str]:
    """Initializers read by ``BatchNormalization`` nodes that do not train. onnxruntime-training runs
    every BatchNormalization in training mode (batch statistics, as torch's train mode does), except
    those whose parameters are constants: it folds those into the convolution before them, with
    running statistics. Declaring them frozen parameters keeps them out of that folding."""
    initializers = {t.name for t in model.graph.initializer}
    out: dict[str, None] = {}
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            out.update((name, None) for name in node.input[1:5] if name in initializers and name not in trainable)
    return list(out)


_GRADIENT_OUTPUTS = {"SoftmaxCrossEntropyLoss": 2, "LayerNormalization": 3, "Dropout": 2, "MaxPool": 2}
"""Ops whose onnxruntime-training gradient reads optional forward outputs (log-probabilities, mean and
inverse std, the dropout mask, the argmax indices) that the exporters leave out when unused."""


def add_gradient_outputs(model: Any) -> None:
    """Give every node of :data:`_GRADIENT_OUTPUTS` its optional outputs (in place), so onnxruntime-training
    can build its gradient."""
    for k, node in enumerate(model.graph.node):
        wanted = _GRADIENT_OUTPUTS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        while wanted is not None and len(node.output) < wanted:
            node.output.append(f"{node.name or node.op_type}_{k}_out{len(node.output)}")
        for j, name in enumerate(node.output):
            if wanted is not None and not name:
                node.output[j] = f"{node.name or node.op_type}_{k}_out{j}"


def lower_ir(model: Any, max_ir: int = MAX_IR_VERSION) -> None:
    """Set ``model.ir_version`` to at most ``max_ir`` (in place). The graphs written here use nothing of
    later IR versions; onnxruntime-training 1.19.2 refuses files that claim them."""
    if model.ir_version > max_ir:
        model.ir_version = max_ir


@contextlib.contextmanager
def _ort_quiet() -> Iterator[None]:
    """Hide onnxruntime's native info logging (written to file descriptor 2) and the root logger's
    info messages while artifacts are generated; what was written is appended to an error raised."""
    import tempfile

    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        except Exception as err:
            os.dup2(saved, 2)
            capture.seek(0)
            lines = [line for line in capture.read().decode(errors="replace").splitlines() if "[I:" not in line]
            if lines:
                err.add_note("\n".join(lines[-20:]))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            root.setLevel(level)


class BlockTrainer:
    """Train one unit from its artifacts with onnxruntime-training (no PyTorch needed).

    Example (needs onnxruntime-training):
        >>> trainer = BlockTrainer("artifacts/block2", lr=1e-3)        # doctest: +SKIP
        >>> trainer.input_names                                        # doctest: +SKIP
        ['h', 'target']
        >>> trainer.step(h1, target=y), trainer.eval_loss(h1, target=y)  # doctest: +SKIP
        >>> trainer.parameters()["blocks.1.layers.2.weight"].shape      # doctest: +SKIP
    """

    def __init__(self, unit_dir: str | os.PathLike[str], *, lr: float | None = None, device: str = "cpu") -> None:
        require("onnxruntime.training", extra=ORT_TRAINING_EXTRA)
        from onnxruntime.training.api import CheckpointState, Module, Optimizer

        self.dir = Path(unit_dir)
        manifest = self.dir / "unit.json"
        if not manifest.is_file():
            raise ExportError(f"{self.dir} holds no unit.json", node=str(self.dir),
                              remedy="pass a unit directory written by export_training_artifacts")
        self.manifest: dict[str, Any] = json.loads(manifest.read_text())
        self.state = CheckpointState.load_checkpoint(str(self.dir / "checkpoint"))
        self.module = Module(str(self.dir / "training_model.onnx"), self.state, str(self.dir / "eval_model.onnx"),
                             device=device)
        self.optimizer = Optimizer(str(self.dir / "optimizer_model.onnx"), self.module)
        lr = lr if lr is not None else self.manifest.get("optimizer", {}).get("lr")
        if lr is not None:
            self.optimizer.set_learning_rate(lr)
        self.steps = 0

    @property
    def input_names(self) -> list[str]:
        """The arguments of :meth:`step` in order; the last one (``target``) is passed by keyword."""
        return list(self.manifest["input_names"])

    @property
    def lr(self) -> float:
        return float(self.optimizer.get_learning_rate())

    @lr.setter
    def lr(self, value: float) -> None:
        self.optimizer.set_learning_rate(value)

    def _feed(self, inputs: Sequence[Any], target: Any, y: Any) -> list[Any]:
        values = [*inputs, target]
        if "y" in self.manifest:
            if y is None:
                raise TypeError(f"{self.dir.name} also needs y= (its coupler path loss)")
            values.append(y)
        expected = len(self.manifest["input_names"])
        if len(values) != expected:
            raise TypeError(f"{self.dir.name} takes {expected - 1} inputs and target= "
                            f"({', '.join(self.manifest['input_names'])}), got {len(values) - 1} and target")
        return [_numpy(v) for v in values]

    def step(self, *inputs: Any, target: Any, y: Any = None) -> float:
        """One training step: forward, backward, optimizer step. Returns the loss before the update."""
        self.module.train()
        loss = self.module(*self._feed(inputs, target, y))
        self.optimizer.step()
        self.module.lazy_reset_grad()
        self.steps += 1
        return float(_first(loss))

    def eval_loss(self, *inputs: Any, target: Any, y: Any = None) -> float:
        """The unit's loss with the eval graph (Dropout off, BatchNorm on its running statistics)."""
        self.module.eval()
        return float(_first(self.module(*self._feed(inputs, target, y))))

    def parameters(self) -> dict[str, Any]:
        """Trainable parameters as numpy arrays, keyed by their name in ``HBLLModel.state_dict()``."""
        out = {}
        for onnx_name, torch_name in self.manifest["trainable"].items():
            out[torch_name] = self.state.parameters[onnx_name].data.copy()
        return out

    def load_into(self, m: nn.Module) -> None:
        """Copy the trained parameters into the compiled model ``m`` (and so into the user's model)."""
        params = dict(m.named_parameters(remove_duplicate=False))
        with torch.no_grad():
            for name, value in self.parameters().items():
                if name not in params:
                    raise ExportError(f"{type(m).__name__} has no parameter {name}", node=name,
                                      remedy="load into the model these artifacts were exported from")
                params[name].copy_(torch.from_numpy(value).to(params[name].device, params[name].dtype))

    def save_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Write the trained state (a checkpoint :class:`BlockTrainer` can be pointed at instead)."""
        from onnxruntime.training.api import CheckpointState

        CheckpointState.save_checkpoint(self.state, str(path))


def _numpy(value: Any) -> Any:
    import numpy as np

    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.ascontiguousarray(value)


def _first(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return value[0]
    return value


def torch_unit_loss(m: HBLLModel, unit: str, *args: torch.Tensor) -> torch.Tensor:
    """The torch value of a unit's local objective, arguments as its ``input_names`` (train mode)."""
    found = [u for u in training_units(m) if u.name == unit]
    if not found:
        raise ExportError(f"no such unit {unit!r}", node=unit, remedy="see training_units(m)")
    return UnitObjective(m, found[0])(*args)

