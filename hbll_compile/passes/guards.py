"""Shape guards: the conditions on input shapes under which ``torch.export`` traced the model.

The captured graph is the model only under those conditions. torch.export fixes every dimension it
is not told is dynamic, and narrows the dynamic ones by the Python branches forward takes on them
(``if x.shape[0] > 4:`` on a batch of 4 keeps the batch dimension in 2..4). Outside them the blocks
may compute something else, silently. :class:`ShapeGuards` keeps torch.export's own guard function
(the ``_guards_fn`` of ``ExportedProgram.module()``) and :meth:`ShapeGuards.check` runs it on every
call of the compiled model, turning a failure into a :class:`~hbll_compile.errors.GuardError` that
names the guard.

Rules:

- only dim 0 (the batch dimension) of an input can stay dynamic; every other dimension is fixed to
  the example's, so ``x.size()[1] == 8`` is a guard like any other;
- an input's batch dimension is dynamic when torch.export left it symbolic; its range is
  torch.export's ``range_constraints`` (a batch of 1 passes unless a guard says otherwise);
- a model captured by ``torch.fx`` has no guards: symbolic tracing records no shape condition, and
  every input whose dim 0 equals the first input's counts as batched;
- guards are not checked while ``torch.jit`` traces or ``torch.compile``/``torch.export`` compiles
  the compiled model: the tracer records shapes of its own (ONNX export checks its result at two
  batch sizes instead).

Example:
    >>> import torch
    >>> class Branchy(torch.nn.Module):
    ...     def forward(self, x):
    ...         return x * 2 if x.shape[0] > 4 else x
    >>> program = torch.export.export(Branchy(), (torch.randn(4, 3),), strict=False,
    ...                               dynamic_shapes=({0: torch.export.Dim.AUTO},))
    >>> guards = ShapeGuards.from_program(program, program.module())
    >>> guards.check(torch.randn(3, 3))  # inside the guards: nothing happens
    >>> for x in (torch.randn(6, 3), torch.randn(3, 5)):
    ...     try:
    ...         guards.check(x)
    ...     except GuardError as err:
    ...         print(f"{err.node}: {err.reason.split(' (')[0]}")
    input x: the batch dimension of input x must be <= 4
    input x: dim 1 of input x must be 3
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from hbll_compile.errors import GuardError

__all__ = ["ShapeGuards"]

_SIZE = re.compile(r"(\w+)\.size\(\)\[(\d+)\]")
_COMPARISON = re.compile(rf"^({_SIZE.pattern}) (<=|>=|<|>|==|!=) (.+)$")
_VERBS = {"==": "must be", "!=": "must not be", "<=": "must be <=", ">=": "must be >=", "<": "must be <",
          ">": "must be >"}
_PREFIX = "Guard failed: "
_MAX_REMEMBERED = 64


@dataclass(frozen=True)
class ShapeGuards:
    """The shape guards of one captured model (see the module docstring).

    ``batched[i]`` says whether input i has a dynamic batch dimension; ``guards_fn`` is torch.export's
    guard function (``None`` for an fx capture), called with the model inputs in order.
    """

    input_names: tuple[str, ...]
    batched: tuple[bool, ...]
    guards_fn: Callable[..., None] | None
    _passed: set[tuple[tuple[int, ...], ...]] = field(default_factory=set, init=False, repr=False, compare=False)
    """Sizes and strides that passed: guards read nothing else, and torch's guard function costs tens of
    microseconds a call (a dynamo config context around it), a set lookup about one."""

    @classmethod
    def from_program(cls, program: torch.export.ExportedProgram, gm: fx.GraphModule) -> ShapeGuards:
        """The guards of ``program``; ``gm`` is its ``program.module()``, which holds the guard function."""
        user_inputs = set(program.graph_signature.user_inputs)
        placeholders = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in user_inputs]
        batched = tuple(_dynamic_dim0(n.meta.get("val"), program.range_constraints) for n in placeholders)
        guards = getattr(gm, "_guards_fn", None)
        # torch.export leaves it out when called from some packages (executorch, torchao): then nothing
        # is checked, as for an fx capture
        return cls(tuple(n.name for n in placeholders), batched, guards.forward if guards is not None else None)

    @classmethod
    def unguarded(cls, gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> ShapeGuards:
        """No guards (an fx capture): inputs sharing the first input's dim 0 count as batched."""
        names = tuple(n.name for n in gm.graph.nodes if n.op == "placeholder")
        rows = inputs[0].shape[0]
        return cls(names, tuple(x.dim() > 0 and x.shape[0] == rows for x in inputs), None)

    def check(self, *inputs: torch.Tensor) -> None:
        """Raise :class:`GuardError` naming the first guard ``inputs`` break."""
        if self.guards_fn is None or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return
        shapes = tuple(x.shape + x.stride() for x in inputs)
        if shapes in self._passed:
            return
        try:
            self.guards_fn(*inputs)
        except AssertionError as err:
            raise _guard_error(str(err), self.input_names, inputs) from err
        except (IndexError, RuntimeError) as err:  # a rank the guard function cannot even index
            shapes_text = ", ".join(f"{name} {tuple(x.shape)}" for name, x in zip(self.input_names, inputs))
            raise GuardError(f"inputs of another rank than the example's ({shapes_text})",
                             node=self.input_names[0],
                             remedy="pass inputs with the example's number of dimensions (a batch first)") from err
        if len(self._passed) >= _MAX_REMEMBERED:
            self._passed.clear()
        self._passed.add(shapes)

    def admits(self, *inputs: torch.Tensor) -> bool:
        """Whether ``inputs`` pass every guard."""
        try:
            self.check(*inputs)
        except GuardError:
            return False
        return True

    def resized(self, inputs: Sequence[torch.Tensor], rows: int) -> tuple[torch.Tensor, ...]:
        """``inputs`` with each batched input's rows cycled (or cut) to ``rows``."""
        return tuple(
            x.index_select(0, torch.arange(rows, device=x.device) % x.shape[0]) if batched else x
            for x, batched in zip(inputs, self.batched)
        )


def _dynamic_dim0(value: object, ranges: dict) -> bool:
    """Dim 0 is dynamic when it is a symbol torch.export kept a range for (a symbol it later fixed by a
    guard such as ``x.size()[0] == 8`` has none)."""
    if not (isinstance(value, torch.Tensor) and value.dim() > 0 and isinstance(value.shape[0], torch.SymInt)):
        return False
    return value.shape[0].node.expr in ranges


def _guard_error(message: str, names: tuple[str, ...], inputs: Sequence[torch.Tensor]) -> GuardError:
    guard = message.removeprefix(_PREFIX).strip()
    comparison = _COMPARISON.match(guard)
    if comparison:
        subject, verb, rhs = _SIZE.sub(_dim_words, comparison[1]), _VERBS[comparison[4]], comparison[5]
        rule = f"{subject} {verb} {_SIZE.sub(_dim_words, rhs)}"
    else:
        rule = f"the input shapes must satisfy {_SIZE.sub(_dim_words, guard)}"
    mentioned = [m[1] for m in _SIZE.finditer(guard)] or list(names)
    shown = [(name, x) for name, x in zip(names, inputs) if name in mentioned] or list(zip(names, inputs))
    shapes = ", ".join(f"{name} of shape {tuple(x.shape)}" for name, x in shown)
    return GuardError(
        f"{rule} (torch.export guard `{guard}`); got {shapes}",
        node=f"input {mentioned[0]}",
        remedy="recompile with an example of the shape you will use, or remove the branch on that shape from "
        "forward (torch.where / torch.cond keep it dynamic)",
    )


def _dim_words(size: re.Match[str]) -> str:
    name, dim = size[1], int(size[2])
    return f"the batch dimension of input {name}" if dim == 0 else f"dim {dim} of input {name}"
