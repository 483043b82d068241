"""ONNX export of a compiled model: the exact chain, or the depth-d subnetwork (DESIGN §3).

:func:`export_onnx` writes one ONNX file whose batch axis is dynamic and, with ``verify=True``, runs it
with onnxruntime (CPU) and compares every output with torch; a difference above ``1e-4`` (max abs) is an
:class:`~hbll_compile.errors.ExportError`.

Exporters. The dynamo exporter (``torch.onnx.export(..., dynamo=True)``, built on ``torch.export``) is
tried first; the legacy TorchScript exporter (``dynamo=False``) is the fallback, and the returned
:class:`ExportReport` says which one wrote the file and why the first one was not used.
Every model of the test zoo (MLP, residual MLP, CNN with BatchNorm and Dropout, ResNet, GPT with tied
embeddings, Inception, MLP-Mixer, masked encoder, two-input net), at depth None and 1, exports with the
dynamo exporter and matches onnxruntime to 1e-5 or better; none needs the legacy one. The legacy
exporter is the fallback for graphs that ``torch.export`` cannot re-trace with a symbolic batch size
or that use an op without a dynamo translation. It traces with concrete
sizes, so shape arithmetic becomes constants: a model that reshapes with the batch size (attention
that does ``x.view(B, T, heads, -1)``, as in the GPT of the zoo) is exported with the example's batch
size baked in, and the dynamic-batch check of ``verify`` rejects it (export with
``dynamic_batch=False`` then, or keep the dynamo exporter).

Example:
    >>> import os, tempfile, torch, hbll_compile as hc
    >>> net = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(4)])
    >>> m = hc.hbll_compile(net, (torch.randn(2, 8),), blocks=4)
    >>> report = hc.export_onnx(m, os.path.join(tempfile.mkdtemp(), "m.onnx"), depth=1)
    >>> report.exporter, report.max_abs_diff < 1e-4
    ('dynamo', True)
"""

from __future__ import annotations

import importlib
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hbll_compile._util import device_of, first_line, max_abs_diff, quiet, random_inputs
from hbll_compile.errors import ExportError
from hbll_compile.model import HBLLModel

__all__ = ["ExportReport", "default_inputs", "export_onnx", "require", "resize_batch", "unsupported_ops"]

EXPORTER_LOGGERS = ("torch.onnx", "torch.export", "onnxscript", "torch._dynamo")
"""Loggers silenced while an exporter runs."""

TOLERANCE = 1e-4
"""Largest max-abs difference between onnxruntime and torch that ``verify`` accepts (DESIGN §6)."""

LEGACY_OPSET = 17
"""Opset the legacy TorchScript exporter writes when none is asked for."""

_ONNX_EXTRA = "pip install 'hbll-compile[onnx]'"


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_onnx` wrote.

    Attributes:
        path: the ONNX file.
        exporter: ``"dynamo"`` or ``"legacy"``, the ``torch.onnx.export`` mode that wrote it.
        max_abs_diff: largest difference between onnxruntime and torch over the checked inputs
            (``None`` without ``verify``).
        depth: the exported depth (``None``: the exact chain).
        input_names: ONNX input names, the model's own argument names.
        output_names: ONNX output names.
        opset: the default-domain opset of the file.
        checked_batches: the batch sizes ``verify`` ran (one differs from the export batch).
        fallback_reason: why the dynamo exporter was not used, if it was not.
    """

    path: str
    exporter: str
    max_abs_diff: float | None
    depth: int | None
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    opset: int
    checked_batches: tuple[int, ...] = ()
    fallback_reason: str | None = field(default=None, repr=False)


def require(*modules: str, extra: str = _ONNX_EXTRA) -> None:
    """Import ``modules`` or raise an :class:`ExportError` that says how to install them."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ExportError(f"the Python package {name!r} is not installed ({err})", node=name,
                              remedy=extra) from err


def default_inputs(m: HBLLModel, batch: int | None = None, *, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs shaped like the compile-time example (``m.report.example_inputs``), with the batch axis set
    to ``batch`` (see :func:`~hbll_compile._util.random_inputs`), on the model's device."""
    return random_inputs(m.report.example_inputs, batch=batch, seed=seed, device=device_of(m))


def resize_batch(inputs: Sequence[torch.Tensor], batch: int) -> tuple[torch.Tensor, ...]:
    """``inputs`` with the batch axis cut or cycled to ``batch`` rows (for a second, different batch)."""
    out = []
    for x in inputs:
        if x.dim() == 0:
            out.append(x)
            continue
        index = torch.arange(batch, device=x.device) % x.shape[0]
        out.append(x.index_select(0, index))
    return tuple(out)


class _Inference(nn.Module):
    """``m(*inputs, depth=depth)`` as a module with a plain positional forward, for the exporters."""

    def __init__(self, m: HBLLModel, depth: int | None) -> None:
        super().__init__()
        self.m = m
        self.depth = depth

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.m(*inputs, depth=self.depth)


def export_onnx(
    m: HBLLModel,
    path: str | os.PathLike[str],
    *,
    depth: int | None = None,
    dynamic_batch: bool = True,
    verify: bool = True,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
    opset: int | None = None,
    exporter: str = "auto",
) -> ExportReport:
    """Write the inference graph of ``m`` to ``path`` and check it with onnxruntime.

    Args:
        m: the compiled model (its mode is restored afterwards; the graph is the eval-mode one).
        path: the ``.onnx`` file to write (parameters inside it, one file).
        depth: ``None`` for the exact chain (equal to the original model), or ``d`` in
            ``0..m.tree.depth`` for the depth-d subnetwork of couplers and blocks.
        dynamic_batch: keep the batch axis (axis 0 of every input and of the output) symbolic.
        verify: run the file with onnxruntime on CPU and compare with torch, on the example inputs and
            on a batch of another size (proving the batch axis is dynamic); raise
            :class:`ExportError` above ``1e-4``.
        example_inputs: the inputs to trace and check with; default: shaped like the compile-time
            example (``m.report.example_inputs``), see :func:`default_inputs`.
        opset: ONNX opset to write (default: the exporter's own; 17 for the legacy exporter).
        exporter: ``"auto"`` (dynamo, then legacy), ``"dynamo"`` or ``"legacy"``.

    Returns:
        an :class:`ExportReport` (path, exporter used, measured max abs difference).

    Raises:
        ExportError: onnx or onnxruntime is missing (``pip install 'hbll-compile[onnx]'``), no
            exporter could write the graph, or onnxruntime disagrees with torch.

    Which models need the legacy exporter: none of the zoo (see the module docstring). It remains the
    fallback for models that ``torch.export`` cannot trace with a symbolic batch; it bakes shape
    arithmetic into constants, so models that reshape with the batch size fail its dynamic-batch check.
    """
    require("onnx")
    if verify:
        require("onnxruntime")
    if exporter not in ("auto", "dynamo", "legacy"):
        raise ExportError(f"unknown exporter {exporter!r}", node="exporter", remedy="use 'auto', 'dynamo' or 'legacy'")
    if depth is not None and not 0 <= depth <= m.tree.depth:
        raise ExportError(f"depth {depth} is outside 0..{m.tree.depth}", node="depth",
                          remedy=f"pass depth=None (the exact chain) or a depth in 0..{m.tree.depth}")
    if depth is not None and depth >= m.tree.depth:
        depth = None  # the deepest subnetwork is the exact chain
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if example_inputs is None:
        batch = max(2, m.report.example_batch)  # torch.export specialises a batch of 1
        inputs = default_inputs(m, batch)
    else:
        inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    input_names = tuple(m.input_names)
    output_names = ("output",)

    attempts = ["dynamo", "legacy"] if exporter == "auto" else [exporter]
    if exporter == "auto" and not _importable("onnxscript"):
        attempts = ["legacy"]
    failures: list[str] = []
    unsupported: set[str] = set()
    for name in attempts:
        try:
            with m.exporting(), torch.no_grad():
                _export(m, depth, inputs, path, name, dynamic_batch, opset, input_names, output_names)
        except ExportError:
            raise
        except Exception as err:  # noqa: BLE001 - any exporter failure means: try the next one
            missing = unsupported_ops(err)
            unsupported |= missing
            why = f"no conversion for {', '.join(sorted(missing))}" if missing else \
                f"{type(err).__name__}: {first_line(err)}"
            failures.append(f"{name} exporter failed: {why}")
            continue
        written_opset = _opset_of(path)
        if not verify:
            return ExportReport(path, name, None, depth, input_names, output_names, written_opset,
                                fallback_reason="; ".join(failures) or None)
        try:
            diff, batches = _check(m, depth, path, inputs, input_names, dynamic_batch)
        except ExportError as err:
            failures.append(f"{name} exporter: {err.reason}")
            if len(attempts) == 1 or name == attempts[-1]:
                raise ExportError("; ".join(failures), node=err.node, remedy=err.remedy) from err
            continue
        return ExportReport(path, name, diff, depth, input_names, output_names, written_opset, batches,
                            fallback_reason="; ".join(failures) or None)
    if unsupported:
        ops = ", ".join(sorted(unsupported))
        raise ExportError(f"the ONNX exporters cannot convert {ops} ({'; '.join(failures)})",
                          node=sorted(unsupported)[0],
                          remedy=f"replace {ops} in the model with operations ONNX supports, or give the dynamo "
                          "exporter a translation for it (torch.onnx.export's custom_translation_table)")
    raise ExportError("; ".join(failures), node="torch.onnx.export",
                      remedy="make the model traceable by torch.export with a dynamic batch (non-strict), "
                      "or export with dynamic_batch=False; report the model to hbll-compile")


def _export(
    m: HBLLModel, depth: int | None, inputs: tuple[torch.Tensor, ...], path: str, exporter: str,
    dynamic_batch: bool, opset: int | None, input_names: tuple[str, ...], output_names: tuple[str, ...],
) -> None:
    wrapper = _Inference(m, depth)
    big = _param_bytes(m) > 1_500_000_000  # protobuf caps one file at 2 GiB
    with warnings.catch_warnings(), quiet(*EXPORTER_LOGGERS):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            batch = torch.export.Dim("batch")
            dynamic = (tuple({0: batch} if x.dim() else {} for x in inputs),) if dynamic_batch else None
            torch.onnx.export(wrapper, inputs, path, dynamo=True, input_names=list(input_names),
                              output_names=list(output_names), opset_version=opset, dynamic_shapes=dynamic,
                              external_data=big, verbose=False)
        else:
            axes = None
            if dynamic_batch:
                axes = {name: {0: "batch"} for name, x in zip(input_names, inputs) if x.dim()}
                axes.update({name: {0: "batch"} for name in output_names})
            torch.onnx.export(wrapper, inputs, path, dynamo=False, input_names=list(input_names),
                              output_names=list(output_names), opset_version=opset or LEGACY_OPSET,
                              dynamic_axes=axes, do_constant_folding=True)


def _check(
    m: HBLLModel, depth: int | None, path: str, inputs: tuple[torch.Tensor, ...], input_names: tuple[str, ...],
    dynamic_batch: bool,
) -> tuple[float, tuple[int, ...]]:
    """Run the file with onnxruntime on the inputs (and on another batch size) and compare with torch."""
    import numpy as np
    import onnxruntime as ort

    batch = int(inputs[0].shape[0]) if inputs[0].dim() else 1
    batches = [inputs]
    if dynamic_batch and inputs[0].dim():
        batches.append(resize_batch(inputs, batch + 3))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001
        raise ExportError(f"onnxruntime cannot load the exported file: {first_line(err)}", node=path,
                          remedy="export with another opset (opset=17) or exporter") from err
    worst = 0.0
    for xs in batches:
        with m.exporting(), torch.no_grad():
            expected = m(*xs, depth=depth)
        expected_list = list(expected) if isinstance(expected, tuple | list) else [expected]
        feed = {name: x.detach().cpu().numpy() for name, x in zip(input_names, xs) if name in _graph_inputs(session)}
        try:
            got = session.run(None, feed)
        except Exception as err:  # noqa: BLE001
            raise ExportError(f"onnxruntime failed on a batch of {len(xs[0])}: {first_line(err)}",
                              node="batch" if xs is not inputs else path,
                              remedy="the graph may have the export batch size baked in; export with the "
                              "dynamo exporter, or with dynamic_batch=False") from err
        for i, (ref, out) in enumerate(zip(expected_list, got)):
            diff = max_abs_diff(ref.detach().cpu(), torch.from_numpy(np.asarray(out)))
            worst = max(worst, diff)
            if diff > TOLERANCE:
                raise ExportError(
                    f"onnxruntime output {i} differs from torch by {diff:.3g} (max abs) on a batch of "
                    f"{len(xs[0])}, above {TOLERANCE:g}",
                    node=f"output {i} (depth {depth})",
                    remedy="try the other exporter (exporter='legacy' or 'dynamo') or another opset; "
                    "if it persists, report the model to hbll-compile",
                )
    return worst, tuple(int(xs[0].shape[0]) for xs in batches)


_UNSUPPORTED = (
    re.compile(r"No ONNX function found for <OpOverload\(op='([\w.]+)'"),  # dynamo
    re.compile(r"Exporting the operator '([\w:.]+)' to ONNX opset version \d+ is not supported"),  # TorchScript
    re.compile(r"Unsupported FX nodes: .*?'([\w.]+)'"),
)


def unsupported_ops(err: BaseException) -> set[str]:
    """The operators an exporter error (or an error it was raised from) says it cannot convert.

    Example:
        >>> unsupported_ops(RuntimeError("Exporting the operator 'aten::foo' to ONNX opset version 17 "
        ...                              "is not supported"))
        {'aten::foo'}
    """
    found: set[str] = set()
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current)
        for pattern in _UNSUPPORTED:
            found.update(pattern.findall(text))
        current = current.__cause__ or current.__context__
    return found


def _graph_inputs(session: Any) -> set[str]:
    return {i.name for i in session.get_inputs()}


def _opset_of(path: str) -> int:
    import onnx

    model = onnx.load(path, load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _param_bytes(m: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in m.parameters())


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True
