"""Capture: turn an ``nn.Module`` into a module-level ``torch.fx.GraphModule`` annotated with shapes and FLOPs.

``torch.export`` (non-strict, batch dimension dynamic) is tried first; ``torch.fx.symbolic_trace`` is the
fallback. In both results every ``get_attr``/``call_module`` target is a fully qualified name in the
user's model, so later passes can bind the very same parameters and buffers.

Modules whose behaviour depends on ``train()``/``eval()`` (BatchNorm, Dropout, InstanceNorm, ...) are
put back as ``call_module`` nodes after export ("relifted"), so mode switches and running statistics
behave exactly as in the original model.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> cap = capture(net, (torch.randn(3, 4),))
    >>> cap.method
    'export'
    >>> [n.meta["hbll"].flops for n in cap.gm.graph.nodes if n.op == "call_function"]
    [192, 0, 96]
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from hbll_compile.errors import CaptureError

MODE_DEPENDENT_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.modules.dropout._DropoutNd,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
    nn.RReLU,
)
"""Leaf modules whose forward reads ``self.training``; they are kept as ``call_module`` nodes."""


@dataclass(frozen=True)
class NodeInfo:
    """What :func:`annotate` records in ``node.meta["hbll"]``.

    ``cost`` is what the partition balances: the node's FLOPs as counted by
    ``torch.utils.flop_counter``, or, for ops that counter ignores (elementwise, norms,
    reshapes), one per output element.
    """

    shape: tuple[int, ...] | None
    dtype: str | None
    flops: int
    param_bytes: int
    is_tensor: bool

    @property
    def cost(self) -> int:
        if self.flops:
            return self.flops
        return int(torch.Size(self.shape).numel()) if self.shape is not None else 0


@dataclass
class Captured:
    """A captured model: ``gm`` holds the graph; its attributes share the model's tensors."""

    gm: fx.GraphModule
    method: str
    example_inputs: tuple[torch.Tensor, ...]


def example_batch(inputs: Sequence[torch.Tensor]) -> int:
    """The batch size of an example: the first input's leading dimension (1 for a scalar input)."""
    return max(int(inputs[0].shape[0]), 1) if inputs[0].dim() else 1


def capture(model: nn.Module, example_inputs: Sequence[Any]) -> Captured:
    """Capture ``model`` on ``example_inputs`` and annotate every node (see :class:`NodeInfo`).

    Raises :class:`CaptureError` naming the source line, the reason and a remedy when both
    ``torch.export`` and ``torch.fx`` fail.
    """
    inputs = _check_inputs(example_inputs)
    was_training = model.training
    model.train()
    try:
        try:
            gm, method = _export(model, inputs), "export"
        except Exception as export_error:  # noqa: BLE001 - any failure falls back to torch.fx
            try:
                gm, method = _symbolic_trace(model), "fx"
            except Exception:  # noqa: BLE001 - the export error explains more; report it
                raise _capture_error(export_error) from export_error
        _check_outputs(gm)
        _refuse_baked_training_flags(gm)
        _follow_input_device(gm)
        annotate(gm, inputs)
    finally:
        model.train(was_training)
    return Captured(gm=gm, method=method, example_inputs=inputs)


def _check_inputs(example_inputs: Sequence[Any]) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    inputs = tuple(example_inputs)
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor):
            raise CaptureError(
                f"example input {i} is a {type(x).__name__}, not a tensor",
                node=f"input {i}",
                remedy="pass only tensors in example_inputs; bind other arguments with functools.partial "
                "or a small wrapper module",
            )
    if not inputs:
        raise CaptureError("example_inputs is empty", remedy="pass a tuple with one example batch per input")
    return inputs


def _export(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> fx.GraphModule:
    batch = torch.export.Dim.AUTO
    dynamic = tuple({0: batch} if x.dim() > 0 and x.shape[0] > 1 else None for x in inputs)
    program = torch.export.export(model, inputs, strict=False, dynamic_shapes=dynamic)
    gm = program.module()
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
    _relift_mode_dependent_modules(gm, model)
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or _is_inplace(n))
    gm.recompile()
    return gm


def _symbolic_trace(model: nn.Module) -> fx.GraphModule:
    return fx.symbolic_trace(model)


def _is_inplace(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return schema is not None and schema.is_mutable


def _relift_mode_dependent_modules(gm: fx.GraphModule, model: nn.Module) -> None:
    """Replace the ATen ops of each BatchNorm/Dropout call by one ``call_module`` to the original module."""
    groups: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op != "call_function" or not stack:
            continue
        key, (path, _) = list(stack.items())[-1]
        if path and isinstance(_submodule(model, path), MODE_DEPENDENT_MODULES):
            groups.setdefault(key, []).append(node)
    for key, nodes in groups.items():
        path = nodes[0].meta["nn_module_stack"][key][0]
        members = set(nodes)
        inputs = {a for n in nodes for a in n.all_input_nodes if a not in members and a.op != "get_attr"}
        outputs = [n for n in nodes if any(u not in members for u in n.users)]
        if len(inputs) != 1 or len(outputs) != 1:
            raise CaptureError(
                f"module {path!r} ({type(_submodule(model, path)).__name__}) was called with "
                f"{len(inputs)} tensor inputs and {len(outputs)} outputs; expected one of each",
                node=nodes[0].name,
                remedy="call BatchNorm/Dropout modules on a single tensor",
            )
        (source,), (result,) = inputs, outputs
        _bind_submodule(gm, path, _submodule(model, path))
        with gm.graph.inserting_after(result):
            call = gm.graph.call_module(path, (source,))
        call.meta = dict(result.meta)
        result.replace_all_uses_with(call)
        for n in reversed(nodes):
            gm.graph.erase_node(n)
    gm.graph.lint()


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _bind_submodule(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    *parents, leaf = path.split(".")
    owner: nn.Module = gm
    for name in parents:
        if not hasattr(owner, name):
            owner.add_module(name, nn.Module())
        owner = getattr(owner, name)
    owner.add_module(leaf, module)


_TRAINING_FLAG_OPS: dict[Any, tuple[int, str, int, str]] = {
    # op: (index of the training flag, its kwarg name, index of the probability, its kwarg name);
    # flag index -1: the op has no flag, a nonzero probability alone means it was traced in train mode
    torch.ops.aten.dropout.default: (2, "train", 1, "p"),
    torch.ops.aten.feature_dropout.default: (2, "train", 1, "p"),
    torch.ops.aten.alpha_dropout.default: (2, "train", 1, "p"),
    torch.ops.aten.feature_alpha_dropout.default: (2, "train", 1, "p"),
    torch.nn.functional.dropout: (2, "training", 1, "p"),
    torch.ops.aten.batch_norm.default: (5, "training", -1, ""),
    torch.nn.functional.batch_norm: (5, "training", -1, ""),
    torch.ops.aten.scaled_dot_product_attention.default: (-1, "", 4, "dropout_p"),
    torch.nn.functional.scaled_dot_product_attention: (-1, "", 4, "dropout_p"),
}


def _refuse_baked_training_flags(gm: fx.GraphModule) -> None:
    """Refuse functional dropout/batch-norm whose ``training=True`` was frozen into the graph.

    After capture ``F.dropout(x, p, self.training)`` is a constant ``True``, so ``eval()`` would
    still drop units: a silent difference from the user's model.
    """
    for node in gm.graph.nodes:
        spec = _TRAINING_FLAG_OPS.get(node.target) if node.op == "call_function" else None
        if spec is None:
            continue
        flag_i, flag_name, p_i, p_name = spec
        default_flag = node.target is torch.nn.functional.dropout
        flag = _arg(node, flag_i, flag_name, default_flag) if flag_i >= 0 else True
        p = _arg(node, p_i, p_name, 0.5 if flag_i >= 0 else 0.0) if p_i >= 0 else 1.0
        if flag is True and p != 0:
            raise CaptureError(
                f"functional {getattr(node.target, '__name__', node.target)} was captured with training=True "
                "frozen in, so eval() would still apply it",
                node=_where(node),
                remedy="use the module form (nn.Dropout / nn.BatchNorm*), which hbll-compile switches with "
                "train()/eval(); for attention dropout apply nn.Dropout to the attention weights; "
                "or set the probability to 0",
            )


def _follow_input_device(gm: fx.GraphModule) -> None:
    """Tensors created inside forward (``torch.arange(T, device=x.device)``) are captured with the
    example's device as a constant; make them follow the first input's device at run time instead,
    so the compiled model works after ``.to("cuda")``."""
    users = [n for n in gm.graph.nodes if n.op == "call_function" and isinstance(n.kwargs.get("device"), torch.device)]
    if not users:
        return
    first_input = next(n for n in gm.graph.nodes if n.op == "placeholder")
    with gm.graph.inserting_after(first_input):
        device = gm.graph.call_function(getattr, (first_input, "device"))
    for n in users:
        n.kwargs = {**n.kwargs, "device": device}
    gm.recompile()


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def _where(node: fx.Node) -> str:
    trace = node.meta.get("stack_trace")
    if trace:
        lines = [ln.strip() for ln in trace.strip().splitlines()]
        files = [ln for ln in lines if ln.startswith("File ")]
        if files:
            return f"{node.name} ({files[-1]})"
    return node.name


def _check_outputs(gm: fx.GraphModule) -> None:
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    values = output.args[0]
    spec = getattr(gm, "_out_spec", None)  # export flattens outputs; the spec keeps their structure
    if spec is not None and not spec.is_leaf():
        values = f"a {getattr(spec.type, '__name__', spec.type)} of {spec.num_leaves} values"
    elif isinstance(values, (tuple, list)) and len(values) == 1:
        values = values[0]
    if not isinstance(values, fx.Node):
        raise CaptureError(
            f"the model returns {_describe_output(values)}; hbll-compile needs exactly one tensor output "
            "(block N's output is the prediction the task loss reads)",
            node="output",
            remedy="wrap the model so forward returns only the prediction tensor, e.g. "
            "`class Wrapped(nn.Module): def forward(self, x): return model(x)[0]`",
        )


def _describe_output(values: Any) -> str:
    if isinstance(values, str):
        return values
    if isinstance(values, (tuple, list)):
        return f"a {type(values).__name__} of {len(values)} values"
    if isinstance(values, dict):
        return f"a dict with keys {sorted(values)}"
    return f"a constant {type(values).__name__}"


def _capture_error(error: Exception) -> CaptureError:
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    where = _user_frame(error)
    data_dependent = any(
        s in type(error).__name__ + str(error)
        for s in ("DataDependent", "data-dependent", "GuardOnDataDependent", "control flow")
    )
    if data_dependent:
        reason = f"data-dependent control flow: {message}"
        remedy = (
            "express the branch with torch.cond / torch.where, or move it into a submodule that is not "
            "split (fx: mark it as a leaf module with a custom torch.fx.Tracer)"
        )
    else:
        reason = f"{type(error).__name__}: {message}"
        remedy = "make the model traceable by torch.export (non-strict), or by torch.fx.symbolic_trace"
    return CaptureError(f"neither torch.export nor torch.fx could capture the model; {reason}",
                        node=where, remedy=remedy)


def _user_frame(error: BaseException) -> str | None:
    """The last traceback frame outside torch and hbll_compile: the user's offending line."""
    torch_dir = os.path.dirname(torch.__file__)
    own_dir = os.path.dirname(os.path.dirname(__file__))
    frames = [
        f for f in traceback.extract_tb(error.__traceback__)
        if not f.filename.startswith((torch_dir, own_dir)) and "<" not in f.filename
    ]
    if not frames:
        return None
    f = frames[-1]
    return f"{f.filename}:{f.lineno} `{(f.line or '').strip()}`"


class _Annotator(fx.Interpreter):
    """Runs the graph on fake tensors, counting FLOPs node by node; real tensors are never touched."""

    def __init__(self, gm: fx.GraphModule, fake_mode: FakeTensorMode) -> None:
        super().__init__(gm)
        self.fake_mode = fake_mode

    def run_node(self, n: fx.Node) -> Any:
        with FlopCounterMode(display=False) as counter:
            result = super().run_node(n)
        n.meta["hbll"] = NodeInfo(
            shape=tuple(result.shape) if isinstance(result, torch.Tensor) else None,
            dtype=str(result.dtype).removeprefix("torch.") if isinstance(result, torch.Tensor) else None,
            flops=int(counter.get_total_flops()),
            param_bytes=self._param_bytes(n),
            is_tensor=isinstance(result, torch.Tensor),
        )
        return result

    def get_attr(self, target: str, args: Any, kwargs: Any) -> Any:
        value = super().get_attr(target, args, kwargs)
        return self.fake_mode.from_tensor(value) if isinstance(value, torch.Tensor) else value

    def call_module(self, target: str, args: Any, kwargs: Any) -> Any:
        module = self.fetch_attr(target)
        named = [*module.named_parameters(), *module.named_buffers()]
        state = {k: self.fake_mode.from_tensor(v) for k, v in named}
        return torch.func.functional_call(module, state, args, kwargs)

    def _param_bytes(self, n: fx.Node) -> int:
        if n.op == "call_module":
            return sum(p.numel() * p.element_size() for p in self.fetch_attr(n.target).parameters())
        total = 0
        for a in n.all_input_nodes:
            if a.op == "get_attr":
                value = self.fetch_attr(a.target)
                if isinstance(value, nn.Parameter):
                    total += value.numel() * value.element_size()
        return total


def annotate(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...]) -> None:
    """Record a :class:`NodeInfo` in ``node.meta["hbll"]`` for every node, using fake tensors only."""
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode:
        fakes = [fake_mode.from_tensor(x) for x in example_inputs]
        _Annotator(gm, fake_mode).run(*fakes)
