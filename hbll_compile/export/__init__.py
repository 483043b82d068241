"""Export: ONNX inference graphs (:mod:`.onnx`) and per-unit onnxruntime-training artifacts (:mod:`.ort_training`).

Both import their optional dependencies (onnx, onnxruntime, onnxruntime-training) only when called.
"""

from hbll_compile.export.onnx import ExportReport, export_onnx
from hbll_compile.export.ort_training import BlockTrainer, TrainingUnit, export_training_artifacts, training_units

__all__ = ["BlockTrainer", "ExportReport", "TrainingUnit", "export_onnx", "export_training_artifacts", "training_units"]
