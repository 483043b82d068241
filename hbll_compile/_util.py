"""Small helpers shared across layers: dotted attribute paths, tensor comparison, a module's device,
and quiet, readable reports of third-party errors.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> lookup(net, "0.bias") is net[0].bias, lookup(net, "0.nothing")
    (True, None)
    >>> max_abs_diff(torch.ones(2), torch.zeros(2)), max_abs_diff(torch.ones(2), torch.ones(3))
    (1.0, inf)
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["assign", "device_of", "first_line", "lookup", "max_abs_diff", "quiet", "random_inputs"]

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def lookup(root: object, target: str) -> Any:
    """The object at dotted ``target`` under ``root`` (``"layer1.0.bn1.weight"``), or None if absent."""
    owner: object = root
    for part in target.split("."):
        if not hasattr(owner, part):
            return None
        owner = getattr(owner, part)
    return owner


def max_abs_diff(a: Any, b: Any) -> float:
    """The largest absolute difference of two tensors; ``inf`` when they are not both tensors of one
    shape, or when non-float tensors differ anywhere."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
        return float("inf")
    if not a.numel():
        return 0.0
    if a.is_floating_point() or a.is_complex():
        return float((a.detach().double() - b.detach().double()).abs().max())
    return 0.0 if torch.equal(a, b) else float("inf")


def device_of(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (CPU for a module without state)."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def first_line(err: BaseException, limit: int = 400) -> str:
    """The first non-empty line of an error's message, without terminal colour codes, at most ``limit``
    characters (the exception's type name when it has no message)."""
    text = _ANSI.sub("", str(err)).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:limit]


@contextlib.contextmanager
def quiet(*loggers: str) -> Iterator[None]:
    """Raise the named loggers to ERROR and swallow stdout for the duration (exporters' progress
    prints and log chatter); both are restored afterwards."""
    handles = [logging.getLogger(name) for name in loggers]
    levels = [lg.level for lg in handles]
    for lg in handles:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(handles, levels):
            lg.setLevel(level)


def random_inputs(
    specs: Sequence[tuple[Sequence[int], str]], *, batch: int | None = None, seed: int = 0,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, ...]:
    """Seeded example inputs, one per ``(shape, dtype name)``: normal samples for float inputs, 0/1 for
    integer and bool inputs (safe ids for any embedding). ``batch`` replaces every leading dimension.

    Example:
        >>> [tuple(x.shape) for x in random_inputs([((4, 3), "float32"), ((4, 7), "int64")], batch=2)]
        [(2, 3), (2, 7)]
    """
    generator = torch.Generator().manual_seed(seed)
    out = []
    for shape, dtype_name in specs:
        shape = tuple(shape)
        if shape and batch is not None:
            shape = (batch, *shape[1:])
        dtype = getattr(torch, dtype_name)
        if dtype.is_floating_point or dtype.is_complex:
            x = torch.randn(shape, generator=generator).to(dtype)
        else:
            x = torch.randint(0, 2, shape, generator=generator).to(dtype)
        out.append(x.to(device) if device is not None else x)
    return tuple(out)


def assign(root: nn.Module, target: str, value: object) -> None:
    """Set dotted ``target`` under ``root`` to ``value``, creating empty parent modules as needed and
    registering it as what it is (parameter, submodule, buffer, or a plain attribute)."""
    *parents, leaf = target.split(".")
    owner = root
    for part in parents:
        if not isinstance(getattr(owner, part, None), nn.Module):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    if getattr(owner, leaf, None) is value:
        return
    owner._parameters.pop(leaf, None)
    owner._buffers.pop(leaf, None)
    owner._modules.pop(leaf, None)
    if isinstance(value, nn.Parameter):
        owner.register_parameter(leaf, value)
    elif isinstance(value, nn.Module):
        owner.add_module(leaf, value)
    elif isinstance(value, torch.Tensor):
        owner.register_buffer(leaf, value)
    else:
        setattr(owner, leaf, value)
