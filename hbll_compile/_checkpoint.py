"""Compiled-model files: every tensor of an ``HBLLModel`` in one safetensors file, plus the settings
needed to compile the same model again (block count, config, example input shapes).

Example:
    >>> import os, tempfile, torch
    >>> path = os.path.join(tempfile.mkdtemp(), "t.safetensors")
    >>> m = torch.nn.Linear(2, 2)
    >>> write(m, path, {"blocks": 1}); read_settings(path)["blocks"]
    1
"""

from __future__ import annotations

import json
import os
from typing import Any

from torch import nn

from hbll_compile.errors import CompileError

__all__ = ["load_into", "read_settings", "write"]

_KEY = "hbll"
"""The safetensors metadata key holding the compile settings (JSON)."""


def write(module: nn.Module, path: str | os.PathLike[str], settings: dict[str, Any]) -> None:
    """Write every parameter and buffer of ``module`` and ``settings`` to ``path``."""
    from safetensors.torch import save_model

    save_model(module, os.fspath(path), metadata={_KEY: json.dumps(settings)})


def read_settings(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The settings stored by :func:`write`.

    Raises:
        CompileError: the file was not written by :func:`write`.
    """
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if _KEY not in metadata:
        raise CompileError(f"{path} was not written by HBLLModel.save", node=os.fspath(path),
                           remedy="save compiled models with m.save(path)")
    settings: dict[str, Any] = json.loads(metadata[_KEY])
    return settings


def load_into(module: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load every tensor of ``path`` into ``module``, strictly (same names, same shapes)."""
    from safetensors.torch import load_model

    load_model(module, os.fspath(path), strict=True)
