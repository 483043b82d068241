"""Export: ONNX inference graphs (:mod:`.onnx`) and per-unit onnxruntime-training artifacts (:mod:`.ort_training`)."""

from hbll_compile.export.onnx import ExportReport, export_onnx

__all__ = ["ExportReport", "export_onnx"]
