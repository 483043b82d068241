"""hbll-compile: train existing PyTorch models with Hierarchical Block-Local Learning (HBLL).

Example:
    >>> import torch, hbll_compile as hc
    >>> net = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(4)])
    >>> m = hc.hbll_compile(net, (torch.randn(2, 8),), blocks=4)
    >>> m.tree.depth
    2
"""

from hbll_compile import ort
from hbll_compile.api import hbll_compile
from hbll_compile.config import HBLLConfig
from hbll_compile.errors import (
    CaptureError,
    CompileError,
    CutError,
    DistributedError,
    ExportError,
    GuardError,
    LoweringError,
    NonFiniteError,
    TrainingError,
)
from hbll_compile.export import ExportReport, export_onnx, export_training_artifacts
from hbll_compile.model import HBLLModel
from hbll_compile.runtime.distributed import DistributedHBLL, distribute
from hbll_compile.runtime.prediction import default_lead, predicted_weights

__all__ = [
    "CaptureError",
    "CompileError",
    "CutError",
    "DistributedError",
    "DistributedHBLL",
    "ExportError",
    "ExportReport",
    "GuardError",
    "HBLLConfig",
    "HBLLModel",
    "LoweringError",
    "NonFiniteError",
    "TrainingError",
    "default_lead",
    "distribute",
    "export_onnx",
    "export_training_artifacts",
    "hbll_compile",
    "ort",
    "predicted_weights",
]
__version__ = "0.1.0"
