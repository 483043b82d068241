"""ONNX graph rewrites that make a dynamo-exported objective trainable by onnxruntime-training 1.19.2.

Each function edits an ``onnx.ModelProto`` in place or returns a new one; none imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["MAX_IR_VERSION", "add_gradient_outputs", "frozen_batchnorm", "lower_ir", "optimize_for_training"]

MAX_IR_VERSION = 10
"""Highest ONNX IR version onnxruntime-training 1.19.2 reads."""


def optimize_for_training(model: Any, trainable: set[str]) -> Any:
    """Simplify an unoptimised dynamo export for onnxruntime-training: fold constants and apply
    onnxscript's default rewrites (``SplitToSequence`` + ``SequenceAt`` become ``Split``, which has a
    gradient). Trainable parameters are turned into graph inputs meanwhile, so no rule treats them as
    constants (a zero-initialised bias would be dropped), and initializers are never merged (the
    exporter's own optimizer deduplicates equal tensors: two zero biases would train as one)."""
    import onnx
    import onnx_ir as ir
    import onnxscript.optimizer as optimizer

    graph = model.graph
    held = [t for t in graph.initializer if t.name in trainable]
    kept = [t for t in graph.initializer if t.name not in trainable]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in held)

    ir_model = ir.serde.deserialize_model(model)
    for _ in range(2):
        optimizer.fold_constants(ir_model)
        optimizer.remove_unused_nodes(ir_model)
    out = ir.serde.serialize_model(ir_model)

    names = {t.name for t in held}
    inputs = [i for i in out.graph.input if i.name not in names]
    del out.graph.input[:]
    out.graph.input.extend(inputs)
    out.graph.initializer.extend(held)
    return out


def frozen_batchnorm(model: Any, trainable: Sequence[str] | dict[str, str]) -> list[str]:
    """Initializers read by ``BatchNormalization`` nodes that do not train. onnxruntime-training runs
    every BatchNormalization in training mode (batch statistics, as torch's train mode does), except
    those whose parameters are constants: it folds those into the convolution before them, with
    running statistics. Declaring them frozen parameters keeps them out of that folding."""
    initializers = {t.name for t in model.graph.initializer}
    out: dict[str, None] = {}
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            out.update((name, None) for name in node.input[1:5] if name in initializers and name not in trainable)
    return list(out)


_GRADIENT_OUTPUTS = {"SoftmaxCrossEntropyLoss": 2, "LayerNormalization": 3, "Dropout": 2, "MaxPool": 2}
"""Ops whose onnxruntime-training gradient reads optional forward outputs (log-probabilities, mean and
inverse std, the dropout mask, the argmax indices) that the exporters leave out when unused."""


def add_gradient_outputs(model: Any) -> None:
    """Give every node of :data:`_GRADIENT_OUTPUTS` its optional outputs (in place), so onnxruntime-training
    can build its gradient."""
    for k, node in enumerate(model.graph.node):
        wanted = _GRADIENT_OUTPUTS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        while wanted is not None and len(node.output) < wanted:
            node.output.append(f"{node.name or node.op_type}_{k}_out{len(node.output)}")
        for j, name in enumerate(node.output):
            if wanted is not None and not name:
                node.output[j] = f"{node.name or node.op_type}_{k}_out{j}"


def lower_ir(model: Any, max_ir: int = MAX_IR_VERSION) -> None:
    """Set ``model.ir_version`` to at most ``max_ir`` (in place). The graphs written here use nothing of
    later IR versions; onnxruntime-training 1.19.2 refuses files that claim them."""
    if model.ir_version > max_ir:
        model.ir_version = max_ir
