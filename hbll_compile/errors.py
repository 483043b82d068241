"""Every refusal hbll-compile makes is a :class:`CompileError` that names the node, the reason and a remedy.

Example:
    >>> err = CutError("two parameter-dependent tensors cross every cut", node="add_3", remedy="use fewer blocks")
    >>> print(err)
    at add_3: two parameter-dependent tensors cross every cut
      remedy: use fewer blocks
"""

from __future__ import annotations

__all__ = [
    "CaptureError",
    "CompileError",
    "CutError",
    "DistributedError",
    "ExportError",
    "LoweringError",
    "NonFiniteError",
    "TrainingError",
]


class CompileError(Exception):
    """Base class of every error hbll-compile raises on a model it cannot compile, train or export."""

    def __init__(self, reason: str, *, node: str | None = None, remedy: str | None = None) -> None:
        self.node = node
        self.reason = reason
        self.remedy = remedy
        text = f"at {node}: {reason}" if node else reason
        if remedy:
            text += f"\n  remedy: {remedy}"
        super().__init__(text)


class CaptureError(CompileError):
    """Neither torch.export nor torch.fx could capture the model graph."""


class CutError(CompileError):
    """The graph has no legal cut where one is needed, or fewer legal cuts than blocks requested.

    ``max_blocks`` is the most blocks the model can be cut into, when that is what was exceeded.
    """

    def __init__(
        self, reason: str, *, node: str | None = None, remedy: str | None = None, max_blocks: int | None = None
    ) -> None:
        super().__init__(reason, node=node, remedy=remedy)
        self.max_blocks = max_blocks


class GuardError(CompileError):
    """Inputs break a shape guard the model was captured under (``if x.shape[0] > 4:``, a fixed
    feature size): the compiled blocks are not known to equal the model on them."""


class LoweringError(CompileError):
    """The blocks could not be built, or they do not reproduce the model."""


class TrainingError(CompileError):
    """The compiled model cannot train as asked (bad target, missing loss, unsupported objective)."""


class NonFiniteError(TrainingError):
    """A training step met a non-finite loss or gradient; it names the unit and what was non-finite."""


class DistributedError(CompileError):
    """A distributed run cannot start or go on: no process group, a placement that does not fit, or a
    rank that raised, died or stopped answering (``node`` names that rank)."""


class ExportError(CompileError):
    """ONNX export failed, or onnxruntime disagrees with torch."""
