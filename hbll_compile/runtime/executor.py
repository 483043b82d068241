"""Single-device interpreter of a :class:`~hbll_compile.runtime.schedule.Schedule`.

One :meth:`Executor.step` runs the stages in order and the tasks of a stage one after another, filling
``.grad`` of every unit by its local objective; the caller's optimizer steps afterwards. Every task kind
has one handler with one signature, ``handler(task) -> None``, found in a dispatch table; tasks of one
stage are independent, so a batched or multi-device executor only needs the same handlers.

With ``HBLLConfig(executor="batched")`` the block updates of structurally identical blocks in one stage
run as one vmapped forward and one backward over stacked parameters (:mod:`~hbll_compile.runtime._batching`);
everything else, and any member whose input differs in shape from the others, runs in the loop. Which
tasks run as a group is worked out once, at construction: each stage becomes a list of work items.

Wavefront schedules read values of earlier steps; the executor keeps them in a ring of the N+1 most
recent batches (a value's ``lag`` says which). Tasks whose inputs are not there yet (the first N-1
steps) are skipped.

:meth:`Executor.register_task_hook` lets a caller observe every task as it runs (tests use it to prove
that no gradient crosses a unit).

Example:
    >>> import torch, hbll_compile as hc
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> m = hc.hbll_compile(net, (torch.randn(2, 4),), blocks=2, loss=torch.nn.functional.cross_entropy)
    >>> loss = m.training_step(torch.randn(5, 4), target=torch.tensor([0, 1, 2, 0, 1]))
    >>> loss.shape, net[0].weight.grad is not None
    (torch.Size([]), True)
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch.utils.hooks import RemovableHandle

from hbll_compile.runtime._batching import BatchPlan, StackedBlocks, batch_key, plan_batching, stack_context
from hbll_compile.runtime.objectives import Env, Units, block_loss, trainable, update_loss
from hbll_compile.runtime.schedule import Schedule, Stage, Task, TaskKind, Value

__all__ = ["Executor", "TaskHook"]

TaskHook = Callable[[Task, bool], None]
"""``hook(task, done)``: called with ``done=False`` just before a task runs and ``done=True`` just after."""


@dataclass
class _Batch:
    """One batch in the wavefront ring: its input, target, context and the boundaries computed for it."""

    x: torch.Tensor
    y: torch.Tensor
    env: Env
    h: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class _Group:
    """The block updates of one stage whose blocks form one batching group, in block order."""

    stack: StackedBlocks
    tasks: tuple[Task, ...]
    members: tuple[int, ...]
    """Each task's block's position in ``stack``."""


class _Ready(NamedTuple):
    """One member of a group whose inputs are there this step."""

    member: int
    task: Task
    h: torch.Tensor
    y: torch.Tensor
    env: Env


class Executor:
    """Interprets ``schedule`` on ``units`` (an :class:`~hbll_compile.runtime.objectives.Units`)."""

    def __init__(self, schedule: Schedule, units: Units) -> None:
        self.schedule = schedule
        self.units = units
        self.wavefront = units.config.objective == "hbll" and units.config.inputs == "wavefront"
        self.ring: deque[_Batch] = deque(maxlen=units.tree.n_blocks + 1)
        self._values: dict[Value, torch.Tensor] = {}
        self._env: Env = {}
        self._memo: dict[tuple[int, Value], torch.Tensor] = {}
        self._bp: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}
        self._losses: dict[int, torch.Tensor] = {}
        self._hooks: OrderedDict[int, TaskHook] = OrderedDict()  # RemovableHandle keeps a weak reference
        self._handlers: dict[TaskKind, Callable[[Task], None]] = {
            TaskKind.BLOCK_FORWARD: self._block_forward,
            TaskKind.COUPLER_FORWARD: self._coupler_forward,
            TaskKind.CORRECT: self._correct,
            TaskKind.BLOCK_UPDATE: self._block_update,
            TaskKind.COUPLER_UPDATE: self._coupler_update,
            TaskKind.HEAD_UPDATE: self._head_update,
            TaskKind.BP_FORWARD: self._bp_forward,
            TaskKind.BP_BACKWARD: self._bp_backward,
        }
        self.batching: BatchPlan | None = plan_batching(units.blocks) if units.config.executor == "batched" else None
        """Which blocks run as one vmap under ``executor="batched"`` (None for the loop executor)."""
        groups = self.batching.groups if self.batching else ()
        self.stacks = {
            group: StackedBlocks([units.blocks[i - 1] for i in group], units.specs[group[0] - 1].context)
            for group in groups
        }
        """The stacked parameters of each group, by its blocks."""
        self._work = [_work_items(stage, self.stacks) for stage in schedule.stages]

    def reset(self) -> None:
        """Forget the wavefront pipeline (e.g. after changing the weights by hand)."""
        self.ring.clear()

    def register_task_hook(self, hook: TaskHook) -> RemovableHandle:
        """Call ``hook(task, done)`` around every task this executor runs; ``handle.remove()`` stops it."""
        handle = RemovableHandle(self._hooks)
        self._hooks[handle.id] = hook
        return handle

    # -- one step --------------------------------------------------------------------------------
    def step(self, inputs: tuple[torch.Tensor, ...], target: torch.Tensor) -> torch.Tensor:
        """Run one training step; returns the task loss of the deepest block that ran (detached), or
        NaN when no block update ran yet (wavefront warm-up)."""
        env = self.units.environment(*inputs)
        if self.wavefront:
            self.ring.appendleft(_Batch(inputs[0], target, env))
        self._values = {Value.batch("x"): inputs[0], Value.batch("y"): target}
        self._env, self._memo, self._bp, self._losses = env, {}, {}, {}
        for work in self._work:
            for item in work:
                tasks = item.tasks if isinstance(item, _Group) else (item,)
                self._notify(tasks, done=False)
                if isinstance(item, _Group):
                    self._block_updates(item)
                else:
                    self._handlers[item.kind](item)
                self._notify(tasks, done=True)
        if not self._losses:
            return torch.tensor(float("nan"))
        return self._losses[max(self._losses)].detach()

    def _notify(self, tasks: Iterable[Task], *, done: bool) -> None:
        for hook in list(self._hooks.values()):
            for task in tasks:
                hook(task, done)

    # -- value plumbing --------------------------------------------------------------------------
    def read(self, value: Value) -> torch.Tensor | None:
        """``value`` as of the last step (None when it is not there: wavefront warm-up or never written)."""
        if not self.wavefront:
            return self._values.get(value)
        if value.lag >= len(self.ring):
            return None
        batch = self.ring[value.lag]
        return batch.x if value.name == "x" else batch.y if value.name == "y" else batch.h.get(value.key)

    def _env_of(self, value: Value) -> Env:
        return self.ring[value.lag].env if self.wavefront else self._env

    def _write(self, value: Value, tensor: torch.Tensor) -> None:
        if self.wavefront:
            self.ring[value.lag].h[value.key] = tensor
        else:
            self._values[value] = tensor

    def _coupled(self, node: int, value: Value, env: Env) -> torch.Tensor:
        """C_v applied to ``value``, computed once per step."""
        key = (node, value)
        if key not in self._memo:
            self._memo[key] = self.units.run_coupler(node, self._need(value), env)
        return self._memo[key]

    def _need(self, value: Value) -> torch.Tensor:
        """A value a staged (non-wavefront) task reads; the schedule guarantees it was written."""
        tensor = self.read(value)
        if tensor is None:
            raise RuntimeError(f"{value} was read before any task wrote it; the schedule is invalid")
        return tensor

    # -- handlers: one per task kind, each ``handler(task) -> None`` --------------------------------
    @torch.no_grad()
    def _block_forward(self, task: Task) -> None:
        (value,) = task.reads
        leaf = self.units.tree.leaves[task.unit.index - 1].id
        self._write(task.writes[0], self.units.run_node(leaf, self._need(value), self._env_of(value)))

    @torch.no_grad()
    def _coupler_forward(self, task: Task) -> None:
        (value,) = task.reads
        self._write(task.writes[0], self._coupled(task.unit.index, value, self._env_of(value)))

    @torch.no_grad()
    def _correct(self, task: Task) -> None:
        """Parareal: ``new_b = C_v(new_a) + f_b(old_{b-1}) − C_v(old_a)``."""
        node = task.unit.index
        new_a, old_last, old_a = task.reads
        env = self._env_of(new_a)
        b = self.units.tree.nodes[node].span[1]
        fine = self.units.run_node(self.units.tree.leaves[b - 1].id, self._need(old_last), env)
        self._write(task.writes[0], self._coupled(node, new_a, env) + fine - self._coupled(node, old_a, env))

    def _block_update(self, task: Task) -> None:
        h_value, y_value = task.reads
        h, y = self.read(h_value), self.read(y_value)
        if h is None or y is None:
            return  # wavefront warm-up: this block's batch has not arrived yet
        loss, out = update_loss(self.units, task, h.detach(), y, self._env_of(h_value))
        _backward(loss.total, trainable(self.units, task))
        self._record(task, loss.task, out)

    _head_update = _block_update  # DGL: block i and its head, trained by the head's loss alone

    def _coupler_update(self, task: Task) -> None:
        node = task.unit.index
        a_value, t_value, y_value = task.reads
        h_a, h_t, y = self.read(a_value), self.read(t_value), self.read(y_value)
        if h_a is None or h_t is None or y is None:
            return
        env = self._env_of(a_value)
        if self.wavefront:
            target = h_t
        else:  # the estimate v's children produce: its right child applied to the split estimate
            with torch.no_grad():
                target = self.units.run_node(self.units.tree.nodes[node].children[1], h_t, env)
        loss, _ = update_loss(self.units, task, h_a.detach(), y, env, target=target)
        _backward(loss.total, trainable(self.units, task))

    def _bp_forward(self, task: Task) -> None:
        i = task.unit.index
        h = self._need(task.reads[0])
        leaf = h.detach().requires_grad_() if i > 1 else None
        out = self.units.run_block(i, leaf if leaf is not None else h, self._env)
        self._bp[i] = (leaf, out)
        self._write(task.writes[0], out)

    def _bp_backward(self, task: Task) -> None:
        i = task.unit.index
        leaf, out = self._bp[i]
        if i == self.units.tree.n_blocks:
            loss = self.units.score(out, self._need(task.reads[1]))
            loss.backward()
            self._losses[i] = loss
        else:
            out.backward(self._need(task.reads[1]))
        if task.writes and leaf is not None and leaf.grad is not None:
            self._write(task.writes[0], leaf.grad)

    def _record(self, task: Task, loss: torch.Tensor, out: torch.Tensor) -> None:
        """Keep an update's task loss and write its detached output (wavefront: ``h{i}@next``)."""
        self._losses[task.unit.index] = loss
        if task.writes:
            self._write(task.writes[0], out.detach())

    # -- batched block updates ---------------------------------------------------------------------
    def _block_updates(self, group: _Group) -> None:
        """The block updates of one group: members whose inputs are there and alike (shape, context) run
        as one vmap; a member alike to no other runs in the loop (e.g. the smaller last batch of an epoch
        in wavefront mode)."""
        alike: dict[Hashable, list[_Ready]] = {}
        for member, task in zip(group.members, group.tasks):
            h_value, y_value = task.reads
            h, y = self.read(h_value), self.read(y_value)
            if h is None or y is None:
                continue  # wavefront warm-up: this block's batch has not arrived yet
            env = self._env_of(h_value)
            key = batch_key(h, [env[name] for name in group.stack.context])
            alike.setdefault(key, []).append(_Ready(member, task, h, y, env))
        for ready in alike.values():
            if len(ready) == 1:
                self._block_update(ready[0].task)
            else:
                self._batched_update(group.stack, ready)

    def _batched_update(self, stack: StackedBlocks, ready: Sequence[_Ready]) -> None:
        """One vmapped forward of the ready members, their losses in a loop, one backward into the
        stacked parameters (and fused heads), then each member parameter gets its slice of the gradient."""
        members = tuple(r.member for r in ready)
        h = torch.stack([r.h.detach() for r in ready])
        out = stack(members, h, stack_context([[r.env[name] for name in stack.context] for r in ready]))
        totals, params = [], list(stack.stacked)
        for r, out_r in zip(ready, out):
            loss = block_loss(self.units, r.task, out_r, r.y, r.env)
            totals.append(loss.total)
            if r.task.head is not None:
                params += list(self.units.heads[str(r.task.unit.index)].parameters())
            self._record(r.task, loss.task, out_r)
        _backward(torch.stack(totals).sum(), params)
        stack.hand_out_grads(members)


def _work_items(stage: Stage, stacks: dict[tuple[int, ...], StackedBlocks]) -> list[Task | _Group]:
    """``stage`` as the executor runs it: each batching group with at least two block updates in the
    stage runs as one item, where its first member stands; every other task is an item of its own."""
    updates = {t.unit.index: t for t in stage if t.kind is TaskKind.BLOCK_UPDATE}
    group_of: dict[Task, _Group] = {}
    for blocks, stack in stacks.items():
        members = tuple(j for j, i in enumerate(blocks) if i in updates)
        if len(members) > 1:
            group = _Group(stack, tuple(updates[blocks[j]] for j in members), members)
            group_of.update((task, group) for task in group.tasks)
    items: list[Task | _Group] = []
    for task in stage:
        group = group_of.get(task)
        if group is None:
            items.append(task)
        elif task is group.tasks[0]:
            items.append(group)
    return items


def _backward(loss: torch.Tensor, params: Iterable[torch.Tensor]) -> None:
    """Backward into ``params`` only: nothing else on the graph receives a gradient."""
    wanted = [p for p in dict.fromkeys(params) if p.requires_grad]
    if wanted and loss.requires_grad:
        torch.autograd.backward(loss, inputs=wanted)
