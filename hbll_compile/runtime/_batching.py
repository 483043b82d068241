"""Batched execution: structurally identical blocks run as one ``torch.func.vmap`` over stacked parameters.

:func:`plan_batching` groups the blocks that can share one vmapped call. Two blocks are structurally
identical when their fx graphs match node for node once attribute and module targets are renamed in
order of first use (same ops, same arguments, same context reads) and their parameters agree in
(renamed) name, shape, dtype and device. Three kinds of block run in the executor's loop instead, and
:attr:`BatchPlan.fallbacks` says which and why:

- blocks with buffers, such as BatchNorm's running statistics: vmap would update one stacked copy
  of a statistic, not the buffer the model owns, so these blocks fall back rather than diverge;
- blocks that share a parameter with another block or within themselves (tied weights): one tensor
  cannot be a slice of two stacks;
- blocks with no structural twin.

:class:`StackedBlocks` keeps one stacked tensor per parameter name (shape ``(k, *p.shape)``) and points
each member parameter's storage at its slice (``p.data = stacked[j]``). The stacked tensors are the
single source of truth: the optimizer updates the user's own ``nn.Parameter`` objects in place, which
writes straight into the stacks, and the vmapped call reads them without a copy. Gradients go back as
views, ``p.grad = stacked.grad[j]``. Conversions that replace storage (``.to()``, ``.double()``,
``load_state_dict(..., assign=True)``) are noticed at the next call by a cheap identity and
``data_ptr`` check, and the stacks are rebuilt from the parameters' current values. The compiled
model's ``state_dict()`` holds copies of the batched parameters, not slices, because safetensors
(``m.save``) refuses to save a tensor that covers only part of its storage; the original model's own
``state_dict()`` still holds the slices, which ``torch.save`` stores as they are.

Attention runs in its math form inside the vmap (``SDPBackend.MATH``): the fused kernels do not batch.
Random ops run with ``randomness="different"``: each member draws its own dropout mask, as in the
loop, but not the same masks the loop would draw.

Example:
    >>> import torch, hbll_compile as hc
    >>> net = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(4)], torch.nn.BatchNorm1d(4))
    >>> m = hc.hbll_compile(net, (torch.randn(2, 4),), blocks=4)
    >>> print(plan_batching(m.blocks).describe())
    vmap: blocks 1, 2, 3
    loop: block 4 (has buffers (BatchNorm statistics or captured constants), which vmap cannot update in place)
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.fx as fx
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from hbll_compile._util import lookup
from hbll_compile.errors import TrainingError

__all__ = [
    "BUFFERS",
    "BatchPlan",
    "StackedBlocks",
    "TIED",
    "UNIQUE",
    "batch_key",
    "blocks_sharing_parameters",
    "plan_batching",
    "stack_context",
    "structure",
]

BUFFERS = "has buffers (BatchNorm statistics or captured constants), which vmap cannot update in place"
TIED = "shares a parameter with another block or within itself (tied weights)"
UNIQUE = "no structurally identical block"


@dataclass(frozen=True)
class BatchPlan:
    """Which blocks (1-based) run as one vmap per group, and why every other block runs in the loop.

    Example:
        >>> print(BatchPlan(((2, 3),), {1: UNIQUE}).describe())
        vmap: blocks 2, 3
        loop: block 1 (no structurally identical block)
    """

    groups: tuple[tuple[int, ...], ...]
    fallbacks: dict[int, str]

    def describe(self) -> str:
        rows = [f"vmap: blocks {', '.join(map(str, group))}" for group in self.groups]
        rows += [f"loop: block {i} ({why})" for i, why in self.fallbacks.items()]
        return "\n".join(rows)


def plan_batching(blocks: Sequence[fx.GraphModule]) -> BatchPlan:
    """Group structurally identical blocks (see the module docstring); computed once per compiled model.

    Example:
        >>> import torch, hbll_compile as hc
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), *[torch.nn.Linear(8, 8) for _ in range(3)])
        >>> plan_batching(hc.hbll_compile(net, (torch.randn(2, 4),), blocks=4).blocks).groups
        ((2, 3, 4),)
    """
    tied = blocks_sharing_parameters(blocks)
    fallbacks: dict[int, str] = {}
    alike: dict[Hashable, list[int]] = {}
    for i, block in enumerate(blocks, 1):
        if any(True for _ in block.buffers()):
            fallbacks[i] = BUFFERS
        elif i in tied:
            fallbacks[i] = TIED
        else:
            alike.setdefault(structure(block), []).append(i)
    fallbacks.update((members[0], UNIQUE) for members in alike.values() if len(members) == 1)
    groups = tuple(tuple(members) for members in alike.values() if len(members) > 1)
    return BatchPlan(groups, dict(sorted(fallbacks.items())))


def structure(block: fx.GraphModule) -> Hashable:
    """A key equal for two blocks exactly when one vmapped call can run both (buffers aside).

    Example:
        >>> import torch, hbll_compile as hc
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
        >>> b = hc.hbll_compile(net, (torch.randn(2, 4),), blocks=2).blocks
        >>> structure(b[0]) == structure(b[1])  # the second has no ReLU
        False
    """
    tokens = _tokens(block)
    position = {node: k for k, node in enumerate(block.graph.nodes)}
    ops = tuple(
        (node.op, _target_key(block, node, tokens), _args_key((node.args, node.kwargs), position))
        for node in block.graph.nodes
    )
    params = tuple(
        (name, tuple(p.shape), p.dtype, p.device)
        for name, p in sorted((norm, block.get_parameter(real)) for norm, real in _renamed(block, tokens).items())
    )
    return ops, params


class StackedBlocks:
    """One group of identical blocks: stacked parameters (the source of truth) and their vmapped call.

    The stacks are built lazily, at the first call, and rebuilt whenever a member parameter was
    replaced or given new storage. ``context`` names what the blocks read besides ``h``, as lowering
    recorded it (``BlockSpec.context``; identical blocks read the same names).

    Example:
        >>> import torch, hbll_compile as hc
        >>> net = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(3)])
        >>> stack = StackedBlocks(hc.hbll_compile(net, (torch.randn(2, 4),), blocks=3).blocks, context=())
        >>> out = stack((0, 1, 2), torch.randn(3, 5, 4), [])
        >>> weight = stack.stacked[stack.names.index("0.weight")]
        >>> out.shape, net[2].weight.data_ptr() == weight[2].data_ptr()
        (torch.Size([3, 5, 4]), True)
    """

    def __init__(self, blocks: Sequence[fx.GraphModule], context: tuple[str, ...]) -> None:
        self.template = blocks[0]
        self.context = context
        renamed = [_renamed(block, _tokens(block)) for block in blocks]
        order = list(renamed[0])
        self.names = tuple(renamed[0][norm] for norm in order)
        """Parameter names of the template (the first block), in the order of :attr:`stacked`."""
        self._slots = [_slot(block, names[norm]) for block, names in zip(blocks, renamed) for norm in order]
        """(owning module, attribute) of every member parameter, member-major."""
        self._bound: list[nn.Parameter] = []
        self._ptrs: list[int] = []
        self.stacked: tuple[torch.Tensor, ...] = ()
        for block in blocks:
            block.register_state_dict_post_hook(_copy_parameters)

    def __call__(
        self, members: Sequence[int], h: torch.Tensor, context: Sequence[tuple[Any, int | None]]
    ) -> torch.Tensor:
        """Blocks ``members`` (ascending positions in the group) on ``h`` stacked along dim 0, with
        ``(value, in_dim)`` per context name (see :func:`stack_context`). Resets the stacks' ``.grad``."""
        self.sync()
        for stacked in self.stacked:
            stacked.grad = None
        params = {name: _take(stacked, members) for name, stacked in zip(self.names, self.stacked)}
        values = tuple(value for value, _ in context)
        dims = tuple(dim for _, dim in context)
        call = torch.func.vmap(self._call, in_dims=(0, 0, *dims), randomness="different")
        # vmap has no batching rule for the fused attention kernels: on CPU it falls back to one call
        # per member, on CUDA the vmapped backward fails ("LSE is not correctly aligned"); attention's
        # math form is plain matmuls and softmax, which batch.
        with sdpa_kernel(SDPBackend.MATH):
            return call(params, h, *values)

    def sync(self) -> None:
        """Rebuild the stacks if a member parameter was replaced or its storage moved (``.to()`` and such)."""
        current = [cast(nn.Parameter, owner._parameters[leaf]) for owner, leaf in self._slots]
        if len(current) == len(self._bound) and all(
            p is q and p.data_ptr() == ptr for p, q, ptr in zip(current, self._bound, self._ptrs)
        ):
            return
        columns = [current[i :: len(self.names)] for i in range(len(self.names))]
        with torch.no_grad():
            self.stacked = tuple(_stack(name, column) for name, column in zip(self.names, columns))
        self._bound, self._ptrs = current, [p.data_ptr() for p in current]

    def hand_out_grads(self, members: Sequence[int]) -> None:
        """Give each trainable member parameter its slice of the stacked gradient, as a view (added to
        an existing ``.grad``, as autograd would)."""
        n = len(self.names)
        for i, stacked in enumerate(self.stacked):
            if stacked.grad is None:
                continue
            for j in members:
                p = self._bound[j * n + i]
                if not p.requires_grad:
                    continue
                if p.grad is None:
                    p.grad = stacked.grad[j]
                else:
                    p.grad += stacked.grad[j]

    def _call(self, params: dict[str, torch.Tensor], h: torch.Tensor, *context: Any) -> torch.Tensor:
        return torch.func.functional_call(self.template, params, (h, *context))


def batch_key(h: torch.Tensor, context: Sequence[Any]) -> Hashable:
    """Members with equal keys can be stacked into one call: same input shape, dtype and device, and
    context tensors of one shape or equal context values.

    Example:
        >>> batch_key(torch.zeros(2, 3), [4]) == batch_key(torch.ones(2, 3), [4]), batch_key(torch.zeros(1, 3), [4])
        (True, ((torch.Size([1, 3]), torch.float32, device(type='cpu')), 4))
    """
    return tuple((v.shape, v.dtype, v.device) if isinstance(v, torch.Tensor) else _hashable(v) for v in (h, *context))


def stack_context(rows: Sequence[Sequence[Any]]) -> list[tuple[Any, int | None]]:
    """Per context name, from one row of values per member: ``(value, None)`` when every member reads
    the same object or an equal non-tensor, else the tensors stacked, ``(stacked, 0)``.

    Example:
        >>> x = torch.ones(2)
        >>> [(tuple(v.shape), d) if d == 0 else (v, d) for v, d in stack_context([[x, 7], [x + 1, 7]])]
        [((2, 2), 0), (7, None)]
    """
    out: list[tuple[Any, int | None]] = []
    for values in zip(*rows):
        first = values[0]
        shared = not isinstance(first, torch.Tensor) or all(v is first for v in values)
        out.append((first, None) if shared else (torch.stack(values), 0))
    return out


def _stack(name: str, column: Sequence[nn.Parameter]) -> torch.Tensor:
    """One stacked leaf tensor for ``column`` (one parameter per member); each member's storage
    becomes a view of it."""
    first = column[0]
    if any((p.shape, p.dtype, p.device) != (first.shape, first.dtype, first.device) for p in column):
        raise TrainingError(
            f"the batched blocks' parameters {name!r} no longer agree in shape, dtype and device",
            node=name,
            remedy="convert the whole compiled model at once (m.to(...), m.double()), "
            "or use HBLLConfig(executor='loop')",
        )
    stacked = torch.stack([p.detach() for p in column]).requires_grad_(any(p.requires_grad for p in column))
    for j, p in enumerate(column):
        p.data = stacked.detach()[j]
    return stacked


def _copy_parameters(module: nn.Module, state_dict: dict[str, Any], prefix: str, metadata: Any) -> None:
    """State-dict hook of a batched block: its (detached) parameter entries become copies of the slices."""
    for name, _ in module.named_parameters():
        value = state_dict[prefix + name]
        if not isinstance(value, nn.Parameter):  # keep_vars=True asks for the parameters themselves
            state_dict[prefix + name] = value.clone()


def _take(stacked: torch.Tensor, members: Sequence[int]) -> torch.Tensor:
    """The members' rows of ``stacked``: itself or a slice (no copy) when they are contiguous."""
    if len(members) == stacked.shape[0]:
        return stacked
    if members[-1] - members[0] + 1 == len(members):
        return stacked[members[0] : members[-1] + 1]
    return stacked[list(members)]


def _tokens(block: fx.GraphModule) -> dict[str, str]:
    """Each get_attr / call_module target renamed ``t0``, ``t1``, ... in order of first use."""
    tokens: dict[str, str] = {}
    for node in block.graph.nodes:
        if node.op in ("get_attr", "call_module"):
            tokens.setdefault(node.target, f"t{len(tokens)}")
    return tokens


def _renamed(block: fx.GraphModule, tokens: dict[str, str]) -> dict[str, str]:
    """Renamed parameter name -> the block's own name, e.g. ``t3`` or ``t2.weight`` (a called module's)."""
    out = {}
    for name, _ in block.named_parameters():
        parts = name.split(".")
        prefix = next(k for k in range(len(parts), 0, -1) if ".".join(parts[:k]) in tokens)
        out[".".join([tokens[".".join(parts[:prefix])], *parts[prefix:]])] = name
    return out


def _target_key(block: fx.GraphModule, node: fx.Node, tokens: dict[str, str]) -> Hashable:
    if node.op == "call_module":
        module = block.get_submodule(str(node.target))
        return tokens[str(node.target)], type(module), repr(module)  # leaf torch.nn modules: repr holds the config
    if node.op == "get_attr":
        value = lookup(block, str(node.target))
        return tokens[str(node.target)] if isinstance(value, nn.Parameter) else ("object", id(value))
    return _hashable(node.target)


def _args_key(value: Any, position: dict[fx.Node, int]) -> Hashable:
    """Node arguments with nodes replaced by their position in the graph."""
    if isinstance(value, fx.Node):
        return "node", position[value]
    if isinstance(value, (list, tuple)):
        return type(value).__name__, tuple(_args_key(v, position) for v in value)
    if isinstance(value, dict):
        return "dict", tuple((k, _args_key(v, position)) for k, v in value.items())
    if isinstance(value, slice):
        return "slice", _args_key((value.start, value.stop, value.step), position)
    return type(value).__name__, _hashable(value)


def _hashable(value: Any) -> Hashable:
    """``value`` itself when hashable and not a tensor, else its identity (equal only to itself)."""
    if isinstance(value, torch.Tensor):
        return "object", id(value)
    try:
        hash(value)
    except TypeError:
        return "object", id(value)
    return value


def _slot(block: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module that owns the dotted attribute ``name`` and the attribute's own name."""
    prefix, _, leaf = name.rpartition(".")
    return block.get_submodule(prefix), leaf


def blocks_sharing_parameters(blocks: Sequence[nn.Module]) -> set[int]:
    """Blocks (1-based) holding a parameter that appears more than once among all blocks' parameters
    (tied weights, within one block or across blocks).

    Example:
        >>> a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        >>> b.weight = a.weight
        >>> blocks_sharing_parameters([a, b, torch.nn.Linear(2, 2)])
        {1, 2}
    """
    owners: dict[int, list[int]] = {}
    for i, block in enumerate(blocks, 1):
        for _, p in block.named_parameters(remove_duplicate=False):
            owners.setdefault(id(p), []).append(i)
    return {i for users in owners.values() if len(users) > 1 for i in users}
