"""HBLL-RNN capture (DESIGN §4): recurrent modules unrolled over time, and the cuts between time steps.

Compiling with ``over="time"`` captures the model inside :func:`unrolled`, which temporarily replaces
the forward of every ``nn.RNN``/``nn.GRU``/``nn.LSTM`` by a Python loop over per-step cell ops
(``gru_cell``, ``lstm_cell``, ``rnn_tanh_cell``, ``rnn_relu_cell``) that read the module's *own*
parameters, so the blocks are bound to them and ``m.to_original() is model`` still holds. A
hand-written loop over ``nn.RNNCell``/``nn.GRUCell``/``nn.LSTMCell`` is unrolled by the capture itself.

Rules, each there so that a cut between two time steps is an ordinary legal cut (one parameter-dependent
tensor crossing it, DESIGN §1):

- **time-major**: all layers of step t run before any layer of step t+1;
- **one state tensor**: the whole recurrent state of a step (every layer; h and c for an LSTM) is packed
  into one tensor ``(batch, state)`` with :func:`torch.cat`, top layer first (``h`` of the last layer,
  then the layers below, then the ``c`` in the same order). The next step reads slices of it, and
  :func:`sink_views` moves those slices next to their readers, so only the packed state is live between
  steps. The first features of the state are the top layer's ``h``, the value a readout usually reads;
- **per-step inputs are context**: ``x[:, t]`` is a parameter-free function of the input, computed once
  and handed to the block that reads it. Layers that act on every step alike before the recurrent
  module (an ``nn.Embedding``, an input ``nn.Linear``, an activation, a (batch, time) transpose) are
  applied per step inside the chunk instead (:func:`push_selects`), so their output is not live
  across a time cut;
- **last-step readouts**: ``out[:, -1]`` (``out[-1]`` time-major) and ``h_n[-1]`` of the stacked
  outputs read the last step's value directly (:func:`fold_stack_selects`), so the outputs of earlier
  steps are not live across later cuts;
- **emitted outputs**: a model that returns every step's output (a language model's
  ``fc(lstm(x)[0])``) has its per-step layers applied before the stack (:func:`push_stacks`) and each
  step's readout moved into its step (:func:`hoist_readouts`); the final stack is assembled outside the
  chunks (:func:`emitted_outputs`), so the steps' outputs are not live across later cuts either. Each
  step's output reads the top layer's ``h`` as a slice of the packed state, so the last step's readout is
  a function of the final state alone (:func:`final_state_cut`).

:func:`time_cuts` picks, among the legal cuts, one per gap between consecutive time steps. Bidirectional
modules, ``proj_size > 0`` and inter-layer dropout cannot be cut over time and are refused.

Example:
    >>> import torch
    >>> from hbll_compile.passes.capture import capture
    >>> from hbll_compile.passes.graph import build_graph
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.rnn, self.fc = torch.nn.GRU(3, 4, batch_first=True), torch.nn.Linear(4, 2)
    ...     def forward(self, x):
    ...         return self.fc(self.rnn(x)[0][:, -1])
    >>> cap = capture(Net(), (torch.randn(2, 5, 3),), over="time")
    >>> view = build_graph(cap.gm)
    >>> len(time_cuts(cap.gm, view))  # 5 steps: 4 gaps between them
    4
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator
from typing import Any, cast

import torch
import torch.fx as fx
from torch import nn

from hbll_compile.errors import CaptureError, CutError
from hbll_compile.passes.graph import GraphView

__all__ = [
    "CELL_OPS",
    "emitted_outputs",
    "final_state_cut",
    "fold_stack_selects",
    "hoist_readouts",
    "push_selects",
    "push_stacks",
    "recurrent_flops",
    "sink_views",
    "time_cuts",
    "unrolled",
]

_aten = torch.ops.aten
CELL_OPS = frozenset({_aten.gru_cell.default, _aten.lstm_cell.default, _aten.rnn_tanh_cell.default,
                      _aten.rnn_relu_cell.default})
"""The per-step cell ops: one node per layer and time step after unrolling."""

_CELLS = {"GRU": torch._VF.gru_cell, "RNN_TANH": torch._VF.rnn_tanh_cell, "RNN_RELU": torch._VF.rnn_relu_cell}
_SEQUENCE_OPS = {_aten.lstm.input: 4, _aten.gru.input: 3, _aten.rnn_tanh.input: 1, _aten.rnn_relu.input: 1}
_VIEWS = frozenset({_aten.slice.Tensor, _aten.select.int, _aten.narrow.default})


@contextlib.contextmanager
def unrolled(model: nn.Module) -> Iterator[None]:
    """Within the block, every ``nn.RNNBase`` and ``nn.LSTMCell`` of ``model`` runs the unrolled,
    packed-state forward described in the module docstring; afterwards the modules are as before.

    Raises:
        CaptureError: a recurrent module that cannot be cut over time (bidirectional, ``proj_size > 0``,
            dropout between layers), named by its path in ``model``.
    """
    patched: list[nn.Module] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.RNNBase):
            _check_module(name, module)
            module.forward = types.MethodType(_sequence_forward, module)
            patched.append(module)
        elif isinstance(module, nn.LSTMCell):
            module.forward = types.MethodType(_lstm_cell_forward, module)  # type: ignore[method-assign]
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward  # the instance attribute; the class's forward is back


def _check_module(name: str, module: nn.RNNBase) -> None:
    what = f"module {name!r} ({type(module).__name__})"
    reasons = []
    if module.bidirectional:
        reasons.append("it is bidirectional: its backward direction reads the end of the sequence first, so no "
                       "cut between time steps is crossed only by the state")
    if getattr(module, "proj_size", 0):
        reasons.append("it has proj_size > 0")
    if module.dropout and module.num_layers > 1:
        reasons.append("it applies dropout between layers, whose training flag a capture would freeze")
    if reasons:
        raise CaptureError(f"over='time' cannot unroll {what}: {'; '.join(reasons)}", node=name,
                           remedy="compile it with over='depth' (the default), or use a unidirectional module "
                           "without proj_size and with dropout=0 (apply nn.Dropout to its output instead)")


def _pack(hs: list[torch.Tensor], cs: list[torch.Tensor]) -> torch.Tensor:
    """One state tensor, top layer first: ``[h_{L-1} .. h_0, c_{L-1} .. c_0]`` (no copy for one tensor)."""
    parts = [*reversed(hs), *reversed(cs)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _slice(state: torch.Tensor, index: int, width: int) -> torch.Tensor:
    return state if state.shape[1] == width else state[:, index * width:(index + 1) * width]


def _sequence_forward(self: nn.RNNBase, x: Any, hx: Any = None) -> tuple[torch.Tensor, Any]:
    """``nn.RNN``/``nn.GRU``/``nn.LSTM`` forward, unrolled time-major with a packed state; same outputs."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise CaptureError(
            f"over='time' needs a batched (3-d) tensor input for {type(self).__name__}, got "
            f"{type(x).__name__ if not isinstance(x, torch.Tensor) else f'a {x.dim()}-d tensor'}",
            node=type(self).__name__, remedy="pass padded batches of shape (batch, time, features) (batch_first) "
            "or (time, batch, features), not packed sequences or single unbatched sequences")
    lstm = self.mode == "LSTM"
    layers, width = self.num_layers, self.hidden_size
    batch, steps = (x.shape[0], x.shape[1]) if self.batch_first else (x.shape[1], x.shape[0])
    if hx is None:  # torch.zeros, not x.new_zeros: the initial state must not read x, only its size
        h0 = [torch.zeros(batch, width, dtype=x.dtype, device=x.device) for _ in range(layers)]
        c0 = [torch.zeros(batch, width, dtype=x.dtype, device=x.device) for _ in range(layers)] if lstm else []
    else:
        h0 = [(hx[0] if lstm else hx)[layer] for layer in range(layers)]
        c0 = [hx[1][layer] for layer in range(layers)] if lstm else []
    state = _pack(h0, c0)
    n_parts = layers * (2 if lstm else 1)
    outputs = []
    for t in range(steps):
        inp = x[:, t] if self.batch_first else x[t]
        hs, cs = [], []
        for layer in range(layers):
            weights: list[Any] = [getattr(self, f"{kind}_l{layer}") if self.bias or kind.startswith("weight")
                                  else None for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            h = _slice(state, layers - 1 - layer, width)
            if lstm:
                c = _slice(state, n_parts - 1 - layer, width)
                h, c = torch._VF.lstm_cell(inp, (h, c), *weights)
                cs.append(c)
            else:
                h = _CELLS[self.mode](inp, h, *weights)
            hs.append(h)
            inp = h
        state = _pack(hs, cs)
        outputs.append(_slice(state, 0, width))  # the top layer's h, read from the state (see hoist_readouts)
    out = torch.stack(outputs, dim=1 if self.batch_first else 0)
    h_n = torch.stack([_slice(state, layers - 1 - layer, width) for layer in range(layers)])
    if not lstm:
        return out, h_n
    return out, (h_n, torch.stack([_slice(state, n_parts - 1 - layer, width) for layer in range(layers)]))


def _lstm_cell_forward(self: nn.LSTMCell, x: torch.Tensor, hx: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``nn.LSTMCell`` forward whose ``(h, c)`` are slices of one packed state, so that a user's loop
    carries a single parameter-dependent tensor from step to step (see :func:`sink_views`)."""
    if hx is None:
        zeros = x.new_zeros(x.shape[0], self.hidden_size)
        hx = (zeros, zeros)
    h, c = torch._VF.lstm_cell(x, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
    state = torch.cat([h, c], dim=1)
    return state[:, :self.hidden_size], state[:, self.hidden_size:]


def fold_stack_selects(gm: fx.GraphModule) -> None:
    """Rewrite ``select(stack(xs, d), d, i)`` to ``xs[i]``, after dropping full slices (``o[:, -1]`` is
    captured as a full slice of dim 0, then a select), so a last-step readout reads only the last step."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is _aten.slice.Tensor and _is_full_slice(node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not _aten.stack.default:
            continue
        parts, dim = node.args[0], node.args[1] if len(node.args) > 1 else 0
        if "val" not in node.meta:  # a torch.fx capture: no aten ops to fold
            continue
        rank = len(node.meta["val"].shape)
        for user in list(node.users):
            if user.op == "call_function" and user.target is _aten.select.int and user.args[0] is node \
                    and user.args[1] % rank == dim % rank:
                user.replace_all_uses_with(parts[user.args[2]])
                gm.graph.erase_node(user)
    gm.graph.eliminate_dead_code()
    gm.recompile()


def _is_full_slice(node: fx.Node) -> bool:
    start = node.args[2] if len(node.args) > 2 else None
    end = node.args[3] if len(node.args) > 3 else None
    step = node.args[4] if len(node.args) > 4 else 1
    return bool(start in (None, 0) and (end is None or (isinstance(end, int) and end >= sys.maxsize // 2))
                and step == 1)


_PER_POSITION_UNARY = frozenset({_aten.relu.default, _aten.gelu.default, _aten.tanh.default, _aten.sigmoid.default,
                                 _aten.silu.default, _aten.leaky_relu.default, _aten.elu.default})


def push_selects(gm: fx.GraphModule) -> None:
    """Take one time step *before* layers that act on every step alike, instead of after them:
    ``select(f(x), d, t)`` becomes ``f(select(x, d, t))`` for an embedding (``d`` an index dimension),
    a linear layer or layer norm (``d`` not a feature dimension), an elementwise activation, or a
    (batch, time) transpose. Then an embedding or input projection applied to the whole sequence before
    the recurrent module runs per step inside the chunks, and only the state crosses a time cut. Values
    are unchanged; the whole-sequence op is dropped when nothing else reads it.
    """
    changed = True
    while changed:
        changed = False
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.target in (_aten.select.int, _aten.sym_size.int) and node.users:
                rewritten = _pushed(gm.graph, node)
                if rewritten is not None:
                    node.replace_all_uses_with(rewritten)
                    gm.graph.erase_node(node)
                    changed = True
        gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()


def _pushed(graph: fx.Graph, select: fx.Node) -> fx.Node | None:
    """``select(f(x), d, t)`` as ``f(select(x, d, t))``, inserted before ``select``; None where that does not
    hold or ``f`` is not one of :func:`push_selects`' ops. A size ``sym_size(f(x), d)`` becomes
    ``sym_size(x, d')`` the same way (the batch size of an initial state must not read the sequence)."""
    source, index = select.args[0], select.args[2:]
    if not isinstance(source, fx.Node) or source.op != "call_function" or "val" not in source.meta:
        return None
    rank = len(source.meta["val"].shape)
    dim = cast(int, select.args[1]) % rank
    op, args = source.target, cast(tuple[Any, ...], source.args)
    size = select.target is _aten.sym_size.int

    def take(x: Any, d: int) -> fx.Node:
        return graph.call_function(cast(Any, select.target), (x, d, *index))

    if size:  # a size passes through every op below; only the op's input changes
        with graph.inserting_before(select):
            if op is _aten.embedding.default and dim < rank - 1:
                return take(args[1], dim)
            if op in (_aten.linear.default, _aten.layer_norm.default) and dim < rank - 1 or op in _PER_POSITION_UNARY:
                return take(args[0], dim)
            if op is _aten.transpose.int and rank == 3 and {args[1] % 3, args[2] % 3} == {0, 1}:
                return take(args[0], 1 - dim if dim < 2 else dim)
        return None

    with graph.inserting_before(select):
        if op is _aten.embedding.default and dim < rank - 1:
            return graph.call_function(op, (args[0], take(args[1], dim), *args[2:]), dict(source.kwargs))
        if op is _aten.linear.default and dim < rank - 1:
            return graph.call_function(op, (take(args[0], dim), *args[1:]), dict(source.kwargs))
        if op is _aten.layer_norm.default and dim < rank - len(args[1]):
            return graph.call_function(op, (take(args[0], dim), *args[1:]), dict(source.kwargs))
        if op in _PER_POSITION_UNARY:
            return graph.call_function(op, (take(args[0], dim), *args[1:]), dict(source.kwargs))
        if op is _aten.transpose.int and rank == 3 and {args[1] % 3, args[2] % 3} == {0, 1} and dim < 2:
            return take(args[0], 1 - dim)
    return None


def push_stacks(gm: fx.GraphModule) -> None:
    """Apply a layer that acts on every step alike to each step's output before they are stacked, instead
    of to the stack: ``f(stack(xs, d))`` becomes ``stack([f(x) for x in xs], d)`` for a linear layer or
    layer norm on the features, or an elementwise activation, where the stack has no other reader; a
    transpose of the time dim with a neighbour stacks along that dim instead (time-major outputs). A
    language model's readout then runs inside each step, and every step's output is *emitted* (see
    :func:`emitted_outputs`). Values are unchanged."""
    changed = True
    while changed:
        changed = False
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.target is _aten.stack.default and len(node.users) == 1 \
                    and "val" in node.meta:
                (user,) = node.users
                parts = cast(list[fx.Node], node.args[0])
                dim = cast(int, node.args[1] if len(node.args) > 1 else 0) % len(node.meta["val"].shape)
                moved = _moved_time_dim(user, node, dim)
                if moved is not None or _acts_per_step(user, node):
                    with gm.graph.inserting_before(user):
                        mapped = parts if moved is not None else [
                            gm.graph.call_function(cast(Any, user.target), (part, *user.args[1:]), dict(user.kwargs))
                            for part in parts]
                        stacked = gm.graph.call_function(_aten.stack.default, (mapped, dim if moved is None else moved))
                    stacked.meta["val"] = user.meta.get("val", node.meta["val"])
                    user.replace_all_uses_with(stacked)
                    gm.graph.erase_node(user)
                    gm.graph.erase_node(node)
                    changed = True
    gm.graph.lint()
    gm.recompile()


def _moved_time_dim(user: fx.Node, stack: fx.Node, dim: int) -> int | None:
    """Where a transpose ``user`` of ``stack`` moves its time dim ``dim``, when it swaps it with a
    neighbour (``stack(xs, d).transpose(d, d+1)`` is ``stack(xs, d+1)``), else None."""
    if user.op != "call_function" or user.target is not _aten.transpose.int or user.args[0] is not stack:
        return None
    rank = len(stack.meta["val"].shape)
    a, b = sorted(cast(int, d) % rank for d in user.args[1:3])
    return (b if dim == a else a) if dim in (a, b) and b == a + 1 else None


def _acts_per_step(user: fx.Node, stack: fx.Node) -> bool:
    """Whether ``user`` applies the same function to every step of ``stack`` (its first argument only)."""
    if user.op != "call_function" or not user.args or user.args[0] is not stack or stack in user.args[1:]:
        return False
    rank = len(stack.meta["val"].shape)
    dim = cast(int, stack.args[1] if len(stack.args) > 1 else 0) % rank
    if user.target is _aten.linear.default:
        return dim < rank - 1
    if user.target is _aten.layer_norm.default:
        return dim < rank - len(cast(list[int], user.args[1]))
    return user.target in _PER_POSITION_UNARY


def emitted_outputs(gm: fx.GraphModule) -> fx.Node | None:
    """The model output when it is a stack of per-step outputs (``out`` of an ``nn.LSTM``, or a readout of
    every step after :func:`push_stacks`), else None. Its parts are *emitted* (DESIGN §4): each goes
    straight to the loss, so a time cut may leave them behind; the stack itself is assembled outside the
    chunks, and its dim is the output's time dimension."""
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    returned = output.all_input_nodes[0] if output.all_input_nodes else None
    if returned is None or returned.op != "call_function" or returned.target is not _aten.stack.default:
        return None
    parts = returned.args[0]
    if not isinstance(parts, (list, tuple)) or len(parts) < 2:
        return None
    order = {n: k for k, n in enumerate(gm.graph.nodes)}
    steps = [_last_cell(cast(fx.Node, p), order) for p in parts]  # a stack of layers' final states reads one step
    return returned if all(a < b for a, b in zip(steps, steps[1:])) and steps[0] >= 0 else None


def _last_cell(node: fx.Node, order: dict[fx.Node, int]) -> int:
    """The graph position of the latest cell op ``node`` depends on (-1 for none)."""
    ancestors: set[fx.Node] = set()
    _ancestors([node], ancestors)
    return max((order[n] for n in ancestors if n.op == "call_function" and n.target in CELL_OPS), default=-1)


def hoist_readouts(gm: fx.GraphModule, stack: fx.Node) -> None:
    """Move every step's readout (the nodes the emitted outputs of ``stack`` depend on that feed no cell)
    to right after its inputs, so step t's readout runs in step t and not after the last step, where
    every step's state would be live across every later cut."""
    feeds_cells: set[fx.Node] = set()
    _ancestors([n for n in gm.graph.nodes if n.op == "call_function" and n.target in CELL_OPS], feeds_cells)
    readout: set[fx.Node] = set()
    _ancestors(list(stack.all_input_nodes), readout, stop=feeds_cells)
    for node in [n for n in gm.graph.nodes if n in readout and n.op == "call_function"]:
        order = {n: k for k, n in enumerate(gm.graph.nodes)}
        latest = max((a for a in node.all_input_nodes if a.op != "get_attr"), key=order.__getitem__, default=None)
        if latest is not None and latest.next is not node:
            latest.append(node)
    gm.graph.lint()
    gm.recompile()


def _ancestors(nodes: list[fx.Node], into: set[fx.Node], stop: set[fx.Node] | None = None) -> None:
    """Add ``nodes`` and their ancestors to ``into``, not entering ``stop``."""
    stop = stop or set()
    todo = [n for n in nodes if n not in stop]
    while todo:
        node = todo.pop()
        if node not in into:
            into.add(node)
            todo.extend(a for a in node.all_input_nodes if a not in stop)


def final_state_cut(gm: fx.GraphModule, view: GraphView) -> int:
    """With emitted outputs: the legal cut right after the last time step's state is complete, before
    its readout. The state crossing it is boundary N (the last chunk's output state), and the nodes
    after it are the step readout (:class:`~hbll_compile.ir.Tail`).

    Raises:
        CutError: no such cut (the last step's readout reads more than the state).
    """
    position = {name: k for k, name in enumerate(view.sequence)}
    last_cell = max(position[n.name] for n in gm.graph.nodes if n.op == "call_function" and n.target in CELL_OPS)
    after = [k for k in view.legal_cuts if k > last_cell]
    if not after:
        raise CutError("the model emits an output at every time step, but the last step's output reads more than "
                       "the recurrent state", node=view.sequence[-1],
                       remedy="compute each step's output from that step's recurrent output only (e.g. "
                       "fc(lstm(x)[0])), or read only the last step (out[:, -1])")
    return after[0]


def sink_views(gm: fx.GraphModule) -> None:
    """Give every reader of a slice/select/narrow its own copy of the view, just before it, so a packed
    state's slices are taken where they are read, not where the state was made (which would make them
    live across the gap), and a view read both by a step's readout and by the next step (a hand-written
    loop's ``h``) does not stay live from one to the other. Views cost nothing."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _VIEWS and node.users:
            readers = sorted(node.users, key=order.__getitem__)
            for reader in readers[1:]:
                with gm.graph.inserting_before(reader):
                    copy = gm.graph.node_copy(node)
                reader.replace_input_with(node, copy)
            if readers[0] is not node.next:
                readers[0].prepend(node)
    gm.graph.lint()
    gm.recompile()


def time_cuts(gm: fx.GraphModule, view: GraphView) -> list[int]:
    """The legal cuts between time steps: one per gap between consecutive steps' cells (the last legal
    cut of the gap, so a step's input projection stays with its step).

    Raises:
        CutError: the model has no recurrent cell, or only the state does not cross between its steps.
    """
    position = {name: k for k, name in enumerate(view.sequence)}
    cells = sorted(position[n.name] for n in gm.graph.nodes if n.op == "call_function" and n.target in CELL_OPS)
    if not cells:
        raise CutError("over='time' found no recurrent module or cell in the model", node="model",
                       remedy="compile a model built on nn.RNN/nn.GRU/nn.LSTM or a loop over nn.RNNCell/"
                       "nn.GRUCell/nn.LSTMCell, or use over='depth'")
    cuts: dict[int, int] = {}  # the cell after the gap -> the last legal cut before it
    for k in view.legal_cuts:
        after = [c for c in cells if c >= k]
        if after and after[0] != cells[0]:
            cuts[after[0]] = max(k, cuts.get(after[0], k))
    if len(cells) > 1 and not cuts:
        raise CutError(
            "over='time' found no gap between time steps that only the recurrent state crosses",
            node="model",
            remedy="keep parameter-dependent work that mixes time steps out of the recurrent loop: a "
            "convolution or attention over time before the recurrent module (move it inside the loop, per "
            "step, or compile with over='depth'), per-step "
            "outputs changed after they are stacked (return them as a (batch, time, ...) stack, a readout "
            "applied to it, and reshape in the loss), or two recurrent modules run one after the other (use "
            "one module with num_layers=2)",
        )
    return sorted(cuts.values())


def recurrent_flops(target: Any, args: Any) -> int:
    """FLOPs of a whole-sequence ``aten.lstm``/``gru``/``rnn_*`` op, which the FLOP counter reports as 0:
    ``2 · batch · time · (weights of every layer and direction)``, the matrix products of every step,
    the same count ``torch.utils.flop_counter`` gives the per-step cell ops. 0 for any other op.

    Example:
        >>> x, w = torch.zeros(2, 3, 4), [torch.zeros(12, 4), torch.zeros(12, 3), torch.zeros(12), torch.zeros(12)]
        >>> recurrent_flops(torch.ops.aten.gru.input, (x, torch.zeros(1, 2, 3), w, True, 1, 0.0, False, False, True))
        1008
    """
    if target not in _SEQUENCE_OPS:
        return 0
    x, weights, batch_first = args[0], args[2], args[8]
    batch, steps = (x.shape[0], x.shape[1]) if batch_first else (x.shape[1], x.shape[0])
    matrices = sum(int(w.numel()) for w in weights if w.dim() == 2)
    return int(2 * batch * steps * matrices)
