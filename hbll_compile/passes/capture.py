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

import contextlib
import inspect
import io
import logging
import os
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from hbll_compile._util import assign, first_line
from hbll_compile.errors import CaptureError
from hbll_compile.passes.guards import ShapeGuards
from hbll_compile.passes.unroll import (
    emitted_outputs,
    fold_stack_selects,
    hoist_readouts,
    push_selects,
    push_stacks,
    recurrent_flops,
    sink_views,
    unrolled,
)

__all__ = ["MODE_DEPENDENT_MODULES", "Captured", "NodeInfo", "annotate", "batched_float_shapes", "capture",
           "preserved_buffers", "quiet_torch_logs"]

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
    is_tensor: bool

    @property
    def cost(self) -> int:
        if self.flops:
            return self.flops
        return int(torch.Size(self.shape).numel()) if self.shape is not None else 0


@dataclass
class Captured:
    """A captured model: ``gm`` holds the graph; its attributes share the model's tensors.
    ``example_inputs`` are copies of the caller's; ``guards`` the shape conditions of the capture."""

    gm: fx.GraphModule
    method: str
    example_inputs: tuple[torch.Tensor, ...]
    guards: ShapeGuards


def example_batch(inputs: Sequence[torch.Tensor]) -> int:
    """The batch size of an example: the first input's leading dimension (1 for a scalar input)."""
    return max(int(inputs[0].shape[0]), 1) if inputs[0].dim() else 1


def batched_float_shapes(captured: Captured) -> dict[str, tuple[int, ...]]:
    """Per-sample shapes of the floating-point tensor nodes whose dim 0 is the example's batch, by name."""
    batch = example_batch(captured.example_inputs)
    shapes = {}
    for n in captured.gm.graph.nodes:
        info = n.meta.get("hbll")
        if info and info.shape and info.shape[0] == batch and info.dtype and info.dtype.startswith(("float", "bfloat")):
            shapes[n.name] = info.shape[1:]
    return shapes


def capture(model: nn.Module, example_inputs: Sequence[Any] | torch.Tensor, *, over: str = "depth") -> Captured:
    """Capture ``model`` on ``example_inputs`` and annotate every node (see :class:`NodeInfo`).

    With ``over="time"`` the recurrent modules are unrolled over time steps with one packed state
    tensor between steps (:mod:`~hbll_compile.passes.unroll`); ``"depth"`` captures them as they are.

    Rules for the example inputs (each refusal is a :class:`CaptureError` with a remedy):

    - a tensor or a tuple/list of tensors, one per forward argument; they are copied, never mutated;
    - dim 0 of the first input is the batch dimension: it must exist (rank >= 1) and hold at least
      2 rows, so torch.export keeps it dynamic (a batch of 1 would be fixed to 1);
    - the model must run on them eagerly; a failure (wrong shape or dtype) names the input shapes
      and the module and source line that failed;
    - the model must leave that batch dimension free: an unbatched example (a single sample of
      shape (features,) for a first ``nn.Linear``) or a forward that fixes the batch size
      (``x.view(4, -1)``) is refused, since couplers and the task loss read dim 0 as the batch.

    Raises :class:`CaptureError` naming the source line, the reason and a remedy when both
    ``torch.export`` and ``torch.fx`` fail.
    """
    inputs = _check_inputs(example_inputs)
    _run_example(model, inputs)
    was_training = model.training
    model.train()
    try:
        try:
            with unrolled(model) if over == "time" else contextlib.nullcontext():
                gm, guards, method = *_export(model, inputs), "export"
        except Exception as export_error:  # noqa: BLE001 - any failure falls back to torch.fx
            if over == "time":  # torch.fx keeps a recurrent module whole: nothing to cut over time
                raise _capture_error(export_error) from export_error
            try:
                gm, method = fx.symbolic_trace(model), "fx"
            except Exception:  # noqa: BLE001 - the export error explains more; report it
                raise _capture_error(export_error) from export_error
            guards = ShapeGuards.unguarded(gm, inputs)
        _refuse_fixed_batch(guards, inputs)
        _check_outputs(gm)
        _refuse_baked_training_flags(gm)
        _follow_input_device(gm)
        if over == "time":
            fold_stack_selects(gm)
            sink_views(gm)
            push_selects(gm)
            push_stacks(gm)
            stack = emitted_outputs(gm)
            if stack is not None:
                hoist_readouts(gm, stack)
        annotate(gm, inputs)
    finally:
        model.train(was_training)
    return Captured(gm=gm, method=method, example_inputs=inputs, guards=guards)


@contextlib.contextmanager
def quiet_torch_logs() -> Iterator[None]:
    """Silence torch's logging while compiling: a failed trace logs dozens of FakeTensor traceback
    lines, while the caller gets the failure as one :class:`CaptureError`. Levels are restored on exit."""
    loggers = [logging.getLogger(name) for name in ["torch", *logging.root.manager.loggerDict]
               if name == "torch" or name.startswith("torch.")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@contextlib.contextmanager
def preserved_buffers(model: nn.Module) -> Iterator[None]:
    """Put every buffer of ``model`` back to its value on entry, in place, on exit: compiling runs
    forward several times and must not move the caller's state (a step counter, running statistics)."""
    saved = [(module, name, buffer.detach().clone())
             for module in model.modules() for name, buffer in module.named_buffers(recurse=False)]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, name, value in saved:
                current = getattr(module, name, None)
                if isinstance(current, torch.Tensor) and current.shape == value.shape and current.dtype == value.dtype:
                    current.copy_(value)  # in place: the compiled blocks are bound to this very tensor
                else:
                    setattr(module, name, value)


def _check_inputs(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise CaptureError(f"example_inputs is a {type(example_inputs).__name__}", node="example_inputs",
                           remedy="pass a tensor or a tuple of tensors, one example batch per forward argument")
    if not example_inputs:
        raise CaptureError("example_inputs is empty", node="example_inputs",
                           remedy="pass a tuple with one example batch per input")
    for i, x in enumerate(example_inputs):
        if not isinstance(x, torch.Tensor):
            raise CaptureError(
                f"example input {i} is a {type(x).__name__}, not a tensor",
                node=f"input {i}",
                remedy="pass only tensors in example_inputs; bind other arguments with functools.partial "
                "or a small wrapper module",
            )
    first = example_inputs[0]
    if first.dim() == 0 or first.shape[0] < 2:
        what = "a 0-d tensor, with no batch dimension" if first.dim() == 0 else f"a batch of {first.shape[0]} rows"
        raise CaptureError(
            f"example input 0 (shape {tuple(first.shape)}) is {what}",
            node="input 0",
            remedy="pass an example batch of at least 2 rows (dim 0 is the batch dimension) so the batch "
            "dimension stays dynamic, e.g. torch.randn(4, *sample_shape)",
        )
    # copies: a forward that writes into its input must not write into the caller's tensor
    return tuple(x.detach().clone() for x in example_inputs)


def _run_example(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    """Run ``model`` once eagerly (eval mode, no gradients): an example it cannot run is the example's
    fault, reported as such and before torch.export buries it in fake-tensor tracebacks."""
    names = {module: name for name, module in model.named_modules()}
    stack: list[nn.Module] = []  # modules entered and not yet left: on failure, the failing one is last

    def enter(module: nn.Module, args: Any) -> None:
        stack.append(module)

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        stack.pop()

    hooks = [h for module in names for h in (module.register_forward_pre_hook(enter),
                                             module.register_forward_hook(leave))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*(x.clone() for x in inputs))
    except Exception as err:  # noqa: BLE001 - any failure here is reported against the example
        module = stack[-1] if stack else model
        where = f"module {names[module]!r} ({type(module).__name__})" if names[module] else type(model).__name__
        frame = _user_frame(err)
        raise CaptureError(
            f"the model fails on its example inputs ({_describe_inputs(model, inputs)}): "
            f"{type(err).__name__}: {first_line(err)}",
            node=f"{where} at {frame}" if frame else where,
            remedy="pass example inputs shaped and typed like one real batch, as forward expects "
            "(e.g. float features of the first nn.Linear's in_features, int64 ids for nn.Embedding)",
        ) from err
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)


def _describe_inputs(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> str:
    try:
        parameters = inspect.signature(model.forward).parameters.values()
        names = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        names = []
    names += [f"input {i}" for i in range(len(names), len(inputs))]
    return ", ".join(f"{name}: {tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}"
                     for name, x in zip(names, inputs))


def _refuse_fixed_batch(guards: ShapeGuards, inputs: tuple[torch.Tensor, ...]) -> None:
    if not guards.batched[0]:
        raise CaptureError(
            f"the model fixes dim 0 of input {guards.input_names[0]} to {inputs[0].shape[0]}, so it is not a batch "
            f"dimension: either the example (shape {tuple(inputs[0].shape)}) is a single unbatched sample, or "
            "forward depends on the exact batch size",
            node=f"input {guards.input_names[0]}",
            remedy="pass an example batch with a leading batch dimension of at least 2 rows; in forward, "
            "derive sizes from the input (x.reshape(x.shape[0], -1), x.flatten(1)) instead of constants",
        )


def _export(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[fx.GraphModule, ShapeGuards]:
    batch = torch.export.Dim.AUTO
    dynamic = tuple({0: batch} if x.dim() > 0 and x.shape[0] > 1 else None for x in inputs)
    with contextlib.redirect_stderr(io.StringIO()):  # a failed trace prints its partial graph there
        program = torch.export.export(model, inputs, strict=False, dynamic_shapes=dynamic)
    gm = program.module()
    guards = ShapeGuards.from_program(program, gm)  # checked by the compiled model on every call instead
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
    _relift_mode_dependent_modules(gm, model)
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or _is_inplace(n))
    gm.recompile()
    return gm, guards


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
        assign(gm, path, model.get_submodule(path))  # grouped above because it exists
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
    message = first_line(error)
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
        self.extra_traceback = False  # run_node names the failing node in a CaptureError already

    def run_node(self, n: fx.Node) -> Any:
        try:
            with FlopCounterMode(display=False) as counter:
                result = super().run_node(n)
        except Exception as err:  # noqa: BLE001 - any op fake tensors cannot run is reported at its node
            raise CaptureError(
                f"the shape of {n.name} does not follow from the input shapes: {type(err).__name__}: "
                f"{first_line(err)}",
                node=_where(n),
                remedy="blocks need shapes fixed by the input shapes; replace data-dependent shapes (boolean "
                "mask indexing, nonzero, unique) by fixed-shape ops such as torch.where",
            ) from err
        n.meta["hbll"] = NodeInfo(
            shape=tuple(result.shape) if isinstance(result, torch.Tensor) else None,
            dtype=str(result.dtype).removeprefix("torch.") if isinstance(result, torch.Tensor) else None,
            flops=int(counter.get_total_flops()) or recurrent_flops(n.target, self.map_nodes_to_values(n.args, n)),
            is_tensor=isinstance(result, torch.Tensor),
        )
        return result

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        value = super().get_attr(target, args, kwargs)
        return self.fake_mode.from_tensor(value) if isinstance(value, torch.Tensor) else value

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        module = self.fetch_attr(str(target))
        named = [*module.named_parameters(), *module.named_buffers()]
        state: dict[str, torch.Tensor] = {k: self.fake_mode.from_tensor(v) for k, v in named}
        return torch.func.functional_call(module, state, args, kwargs)


def annotate(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...]) -> None:
    """Record a :class:`NodeInfo` in ``node.meta["hbll"]`` for every node, using fake tensors only."""
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode:
        fakes = [fake_mode.from_tensor(x) for x in example_inputs]
        _Annotator(gm, fake_mode).run(*fakes)
