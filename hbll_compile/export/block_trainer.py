"""Train one unit from its onnxruntime-training artifacts, without PyTorch: :class:`BlockTrainer`.

The artifacts come from :func:`hbll_compile.export.ort_training.export_training_artifacts`; install
onnxruntime-training with ``pip install 'hbll-compile[ort-training]'`` (see that module).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hbll_compile.errors import ExportError
from hbll_compile.export.onnx import require

__all__ = ["ORT_TRAINING_EXTRA", "BlockTrainer"]

ORT_TRAINING_EXTRA = (
    "pip install 'hbll-compile[ort-training]' (onnxruntime-training 1.19.2, Python <= 3.11) in an environment of "
    "its own: it replaces the 'onnxruntime' module of the inference package"
)


class BlockTrainer:
    """Train one unit from its artifacts with onnxruntime-training (no PyTorch needed).

    Example (needs onnxruntime-training, so not run as a doctest)::

        trainer = BlockTrainer("artifacts/block2", lr=1e-3)
        trainer.input_names
        # ['h', 'target']
        trainer.step(h1, target=y), trainer.eval_loss(h1, target=y)
        trainer.parameters()["blocks.1.layers.2.weight"].shape
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
