"""Compiled-model files: every tensor of an ``HBLLModel`` (its state dict, wavefront pipeline included)
in one safetensors file, the settings needed to compile the same model again, a checksum, and
optionally an optimizer's state.

Rules:
- a file whose tensors do not match its checksum (truncated, a flipped byte) is refused;
- loading into a model whose tensors differ in name or shape is refused with the difference listed;
- optimizer state is stored under ``optimizer.*`` tensor names with its non-tensor parts as JSON, so
  ``restore_optimizer`` gives an optimizer built on the loaded model's parameters the saved state.

Example:
    >>> import os, tempfile, torch
    >>> path = os.path.join(tempfile.mkdtemp(), "new", "t.safetensors")
    >>> m = torch.nn.Linear(2, 2)
    >>> write(m, path, {"blocks": 1}); read_settings(path)["blocks"]
    1
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from hbll_compile._util import first_line
from hbll_compile.errors import CompileError

__all__ = ["load_into", "read_settings", "restore_optimizer", "write"]

_SETTINGS, _CHECKSUM, _OPTIMIZER = "hbll", "hbll.sha256", "hbll.optimizer"
"""Metadata keys: the compile settings (JSON), the tensors' checksum, the optimizer's non-tensor state."""
_OPT_PREFIX, _EXTRA_PREFIX, _PIPELINE_PREFIX = "optimizer.", "extra.", "pipeline."


def write(
    module: nn.Module, path: str | os.PathLike[str], settings: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None, extra: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Write every tensor of ``module.state_dict()`` (and ``optimizer``'s state, and ``extra`` tensors
    under ``extra.*``) with ``settings`` and a checksum to ``path``, creating its directory."""
    from safetensors.torch import save_file

    tensors = _unshared(module.state_dict())
    tensors.update((f"{_EXTRA_PREFIX}{k}", v.detach().contiguous().clone()) for k, v in (extra or {}).items())
    metadata = {_SETTINGS: json.dumps(settings)}
    if optimizer is not None:
        opt_tensors, rest = _flatten_optimizer(optimizer.state_dict())
        tensors.update(opt_tensors)
        metadata[_OPTIMIZER] = json.dumps(rest)
    metadata[_CHECKSUM] = _checksum(tensors)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, path, metadata=metadata)


def read_settings(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The settings stored by :func:`write`.

    Raises:
        CompileError: the file is missing, unreadable, or was not written by :func:`write`.
    """
    metadata, _ = _read(path, tensors=False)
    settings: dict[str, Any] = json.loads(metadata[_SETTINGS])
    return settings


def load_into(module: nn.Module, path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load the model tensors of ``path`` into ``module`` after checking the file's checksum; returns
    the ``extra`` tensors saved with them.

    Raises:
        CompileError: corrupt file, or tensors that differ from ``module``'s in name or shape.
    """
    _, tensors = _read(path, tensors=True)
    state = {k: v for k, v in tensors.items() if not k.startswith((_OPT_PREFIX, _EXTRA_PREFIX))}
    own = module.state_dict()
    # the training pipeline's tensors (``pipeline.*``) depend on how far training got, not on the model
    missing = sorted(k for k in set(own) - set(state) if not k.startswith(_PIPELINE_PREFIX))
    unexpected = sorted(k for k in set(state) - set(own) if not k.startswith(_PIPELINE_PREFIX))
    reshaped = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or reshaped:
        parts = [f"{label}: {', '.join(names[:6])}{' ...' if len(names) > 6 else ''}"
                 for label, names in (("missing", missing), ("unexpected", unexpected), ("other shape", reshaped))
                 if names]
        raise CompileError(f"{path} does not fit the model built by the factory ({'; '.join(parts)})",
                           node=os.fspath(path), remedy="load with the factory the model was saved with")
    module.load_state_dict(state, strict=True)
    return {k.removeprefix(_EXTRA_PREFIX): v for k, v in tensors.items() if k.startswith(_EXTRA_PREFIX)}


def restore_optimizer(optimizer: torch.optim.Optimizer, path: str | os.PathLike[str]) -> None:
    """Give ``optimizer`` (built on the loaded model's parameters, in the same order) the saved state.

    Raises:
        CompileError: the file holds no optimizer state, or it does not fit ``optimizer``.
    """
    metadata, tensors = _read(path, tensors=True)
    if _OPTIMIZER not in metadata:
        raise CompileError(f"{path} holds no optimizer state", node=os.fspath(path),
                           remedy="save with m.save(path, optimizer=opt)")
    state = _unflatten_optimizer({k: v for k, v in tensors.items() if k.startswith(_OPT_PREFIX)},
                                 json.loads(metadata[_OPTIMIZER]))
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError) as err:
        raise CompileError(f"the optimizer state in {path} does not fit this optimizer: {first_line(err)}",
                           node="optimizer", remedy="build the same optimizer class on m.parameters()") from err


def _read(path: str | os.PathLike[str], *, tensors: bool) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CompileError(f"no such file: {path}", node=path, remedy="pass the path m.save(...) wrote")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            loaded = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except Exception as err:  # noqa: BLE001 - safetensors reports corruption with several exception types
        raise CompileError(f"{path} is not a readable safetensors file ({first_line(err)})", node=path,
                           remedy="the file is truncated or corrupt; save the model again") from err
    if _SETTINGS not in metadata:
        raise CompileError(f"{path} was not written by HBLLModel.save", node=path,
                           remedy="save compiled models with m.save(path)")
    if tensors and metadata.get(_CHECKSUM) != _checksum(loaded):
        raise CompileError(f"{path} is corrupt: its tensors do not match the checksum saved with them", node=path,
                           remedy="save the model again; the file was changed after it was written")
    return metadata, loaded


def _checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _unshared(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor as its own contiguous copy: safetensors refuses tensors that share storage (tied
    weights, views), and a loaded state dict restores sharing through the model's own parameters."""
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    rest: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for index, entries in state["state"].items():
        plain = {}
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{_OPT_PREFIX}{index}.{name}"] = value.detach().contiguous().clone()
            else:
                plain[name] = value
        rest["state"][str(index)] = plain
    return tensors, rest


def _unflatten_optimizer(tensors: Mapping[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(k): dict(v) for k, v in rest["state"].items()}
    for key, value in tensors.items():
        index, name = key.removeprefix(_OPT_PREFIX).split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}
