"""Per-unit onnxruntime-training artifacts: every block and coupler of a compiled model as its own
training graph on its local objective (DESIGN §2, step 3); :class:`~hbll_compile.export.block_trainer.BlockTrainer`
trains one. The units are the schedule's update tasks (:mod:`hbll_compile.export.units`).

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

onnxruntime-training is the last release of the ORT training API (1.19.2, Python ≤ 3.11); it reads ONNX
IR version ≤ 10, so every file written here is lowered to IR 10 (newer ``onnx`` writes IR 11+) and to
an opset it supports (20 by default). It installs the same ``onnxruntime`` Python module as the
inference package, so keep it in its own environment: ``pip install 'hbll-compile[ort-training]'``.

BatchNorm: the training graph normalises with batch statistics, as torch's train mode does, but the
running statistics are graph constants (ORT training has no buffer updates); re-estimate them in torch
before evaluating in eval mode, or evaluate with batch statistics.

Example (needs onnxruntime-training, so not run as a doctest)::

    import torch, hbll_compile as hc
    m = hc.hbll_compile(net, (x,), blocks=4, loss=torch.nn.functional.cross_entropy)
    hc.export_training_artifacts(m, "artifacts")
    trainer = hc.ort.BlockTrainer("artifacts/block2")
    loss = trainer.step(h1, target=y)
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
from pathlib import Path
from typing import Any

import torch

from hbll_compile._util import first_line, quiet
from hbll_compile.errors import ExportError
from hbll_compile.export._rewrites import (
    MAX_IR_VERSION,
    add_gradient_outputs,
    frozen_batchnorm,
    lower_ir,
    optimize_for_training,
)
from hbll_compile.export.block_trainer import ORT_TRAINING_EXTRA
from hbll_compile.export.onnx import EXPORTER_LOGGERS, default_inputs, require
from hbll_compile.export.units import (
    TrainingUnit,
    UnitObjective,
    chain_boundaries,
    guess_target,
    training_units,
    unit_example,
)
from hbll_compile.model import HBLLModel

__all__ = ["export_training_artifacts"]

MAX_OPSET = 21
"""Highest default-domain opset onnxruntime-training 1.19.2 runs."""
DEFAULT_OPSET = 20
FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")


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
            the model has no task loss, its couplers are label-conditioned, it emits an output at every
            time step, or a unit's graph cannot be exported or differentiated.
    """
    if m.emission is not None:
        raise ExportError("the model emits an output at every time step, and a unit's exported objective covers "
                          "only a last-step output", node="output",
                          remedy="train it in PyTorch (m.fit), or export the inference graph with export_onnx")
    if m.config.coupler_condition != "none":
        raise ExportError("the exported units would not receive the labels their couplers are conditioned on "
                          f"(coupler_condition={m.config.coupler_condition!r})", node="coupler_condition",
                          remedy="export a model compiled with coupler_condition='none', or train it in PyTorch")
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
        m, max(2, m.report.example_batch))
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
        with warnings.catch_warnings(), quiet(*EXPORTER_LOGGERS):
            warnings.simplefilter("ignore")
            torch.onnx.export(objective, args, str(forward_path), dynamo=True, input_names=names,
                              output_names=["loss"], opset_version=opset, dynamic_shapes=dynamic,
                              external_data=False, optimize=False, verbose=False)
    except Exception as err:  # noqa: BLE001
        raise ExportError(f"cannot export the objective of {unit.name}: {type(err).__name__}: {first_line(err)}",
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
                          f"{type(err).__name__}: {first_line(err)}", node=unit.name,
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
            add_note = getattr(err, "add_note", None)  # Python >= 3.11
            if lines and add_note is not None:
                add_note("\n".join(lines[-20:]))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            root.setLevel(level)


