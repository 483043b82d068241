"""On-device training of single units with onnxruntime-training: ``hc.ort.BlockTrainer``.

See :mod:`hbll_compile.export.ort_training`; install with ``pip install 'hbll-compile[ort-training]'``.
"""

from hbll_compile.export import BlockTrainer, export_training_artifacts, training_units

__all__ = ["BlockTrainer", "export_training_artifacts", "training_units"]
