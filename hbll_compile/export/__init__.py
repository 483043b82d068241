"""Export: ONNX inference graphs (:mod:`.onnx`) and per-unit onnxruntime-training artifacts
(:mod:`.ort_training`, :mod:`.units`, :mod:`.block_trainer`).

Every module imports its optional dependencies (onnx, onnxruntime, onnxruntime-training) only when called.
"""

from hbll_compile.export.block_trainer import BlockTrainer
from hbll_compile.export.onnx import ExportReport, export_onnx
from hbll_compile.export.ort_training import export_training_artifacts
from hbll_compile.export.units import TrainingUnit, training_units

__all__ = ["BlockTrainer", "ExportReport", "TrainingUnit", "export_onnx", "export_training_artifacts", "training_units"]
