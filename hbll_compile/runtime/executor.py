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
from typing import NamedTuple, cast

import torch
import torch.fx as fx
from torch.utils.hooks import RemovableHandle

from hbll_compile.errors import NonFiniteError
from hbll_compile.runtime._batching import BatchPlan, StackedBlocks, batch_key, plan_batching, stack_context
from hbll_compile.runtime.objectives import Env, Units, block_loss, trainable, update_loss
from hbll_compile.runtime.schedule import Schedule, Stage, Task, TaskKind, Value

__all__ = ["Executor", "RingEntry", "TaskHook"]

TaskHook = Callable[[Task, bool], None]
"""``hook(task, done)``: called with ``done=False`` just before a task runs and ``done=True`` just after."""


@dataclass
class RingEntry:
    """One batch in the wavefront ring: its inputs, target, environment (inputs and context values) and
    the boundaries computed for it so far, by key (``"h3"``)."""

    inputs: tuple[torch.Tensor, ...]
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


class _Check(NamedTuple):
    """What the end-of-step check of one update needs: its loss, the parameters its backward reached,
    and its input and target (named in the error)."""

    task: Task
    loss: torch.Tensor | None
    params: list[torch.nn.Parameter]
    h: torch.Tensor
    y: torch.Tensor


class _Ready(NamedTuple):
    """One member of a group whose inputs are there this step."""

    member: int
    task: Task
    h: torch.Tensor
    y: torch.Tensor
    env: Env


class Executor:
    """Interprets ``schedule`` on ``units`` (an :class:`~hbll_compile.runtime.objectives.Units`)."""

    def __init__(self, schedule: Schedule, units: Units, *, owns: Callable[[Task], bool] | None = None) -> None:
        """``owns`` selects the tasks this executor runs (default: all); a distributed executor runs
        each rank's share of one schedule."""
        self.schedule = schedule
        self.units = units
        self.wavefront = units.config.objective == "hbll" and units.config.inputs == "wavefront"
        self.ring: deque[RingEntry] = deque(maxlen=units.tree.n_blocks + 1)
        """Wavefront mode: the N+1 most recent batches, newest first (``ring[k]`` entered k steps ago)."""
        self.steps = 0
        """Training steps completed (a step that raised is not counted)."""
        self._written: list[tuple[RingEntry, str]] = []
        self._checks: list[_Check] = []
        self._values: dict[Value, torch.Tensor] = {}
        self._env: Env = {}
        self._memo: dict[tuple[int, Value], torch.Tensor] = {}
        self._bp: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}
        self._emitted: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        """Under ``"bp"`` with an emission: each chunk's emitted outputs and, once the loss ran, their gradient."""
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
        blocks = cast("list[fx.GraphModule]", list(units.blocks))
        self.batching: BatchPlan | None = plan_batching(blocks) if units.config.executor == "batched" else None
        """Which blocks run as one vmap under ``executor="batched"`` (None for the loop executor)."""
        groups = self.batching.groups if self.batching else ()
        self.stacks = {
            group: StackedBlocks([blocks[i - 1] for i in group], units.specs[group[0] - 1].context)
            for group in groups
        }
        """The stacked parameters of each group, by its blocks."""
        self._work = [_work_items(tuple(t for t in stage if owns is None or owns(t)), self.stacks)
                      for stage in schedule.stages]

    def reset(self) -> None:
        """Forget the wavefront pipeline (e.g. after changing the weights by hand)."""
        self.ring.clear()

    def pipeline_state(self) -> dict[str, torch.Tensor]:
        """The step counter and the wavefront ring as named tensors (``steps``, ``{k}.in{j}``, ``{k}.y``,
        ``{k}.h{i}`` for the batch that entered k steps ago): what a resumed run needs to continue
        exactly where this one stopped."""
        state = {"steps": torch.tensor(self.steps)}
        for k, entry in enumerate(self.ring):
            state.update((f"{k}.in{j}", x) for j, x in enumerate(entry.inputs))
            state[f"{k}.y"] = entry.y
            state.update((f"{k}.{key}", h) for key, h in entry.h.items())
        return state

    def load_pipeline_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`pipeline_state` returned (context values are recomputed from the inputs)."""
        self.steps = int(state.get("steps", torch.tensor(0)))
        entries: dict[int, dict[str, torch.Tensor]] = {}
        for name, value in state.items():
            if name != "steps":
                lag, key = name.split(".", 1)
                entries.setdefault(int(lag), {})[key] = value
        self.ring.clear()
        for k in sorted(entries):
            fields = entries[k]
            inputs = tuple(fields.pop(f"in{j}") for j in range(sum(key.startswith("in") for key in fields)))
            y = fields.pop("y")
            self.ring.append(RingEntry(inputs, y, self.units.environment(*inputs, target=y), fields))

    def register_task_hook(self, hook: TaskHook) -> RemovableHandle:
        """Call ``hook(task, done)`` around every task this executor runs; ``handle.remove()`` stops it."""
        handle = RemovableHandle(self._hooks)
        self._hooks[handle.id] = hook
        return handle

    # -- one step --------------------------------------------------------------------------------
    def step(self, inputs: tuple[torch.Tensor, ...], target: torch.Tensor) -> torch.Tensor:
        """Run one training step; returns the task loss of the deepest block that ran (detached), or
        NaN when no block update ran yet (wavefront warm-up). With an emission, the sum of the shares of
        the task loss that the chunks' own outputs carry (the whole loss when all chunks ran one batch).

        A step either completes or leaves no trace: when a task raises (for example
        :class:`~hbll_compile.errors.NonFiniteError` for a non-finite loss or gradient), every ``.grad``
        is put back as it was before the step and the wavefront ring forgets this batch.
        """
        saved = {p: p.grad.clone() for p in self._parameters() if p.grad is not None}
        newest = self.ring[0] if self.ring else None
        dropped = self.ring[-1] if len(self.ring) == self.ring.maxlen else None
        self._written = []
        try:
            loss = self._run(inputs, target)
        except BaseException:
            for p in self._parameters():
                p.grad = saved.get(p)
            for entry, key in self._written:
                entry.h.pop(key, None)
            if self.ring and self.ring[0] is not newest:  # this step's batch entered the ring
                self.ring.popleft()
                if dropped is not None:
                    self.ring.append(dropped)
            raise
        self.steps += 1
        return loss

    def _parameters(self) -> list[torch.nn.Parameter]:
        units = self.units
        return [*units.blocks.parameters(), *units.couplers.parameters(), *units.heads.parameters()]

    def _run(self, inputs: tuple[torch.Tensor, ...], target: torch.Tensor) -> torch.Tensor:
        env = self.units.environment(*inputs, target=target)
        if self.wavefront:
            self.ring.appendleft(RingEntry(inputs, target, env))
        self._values = {Value.batch("x"): inputs[0], Value.batch("y"): target}
        self._env, self._memo, self._bp, self._losses, self._checks = env, {}, {}, {}, []
        self._emitted = {}
        for work in self._work:
            for item in work:
                tasks = item.tasks if isinstance(item, _Group) else (item,)
                self._notify(tasks, done=False)
                if isinstance(item, _Group):
                    self._block_updates(item)
                else:
                    self._handlers[item.kind](item)
                self._notify(tasks, done=True)
        self._check_finite()
        if not self._losses:
            return torch.tensor(float("nan"))
        if self.units.emission is not None:  # each chunk's share of the sequence's loss
            return torch.stack(list(self._losses.values())).sum().detach()
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
        entry = self.ring[value.lag]
        return entry.inputs[0] if value.name == "x" else entry.y if value.name == "y" else entry.h.get(value.key)

    def _env_of(self, value: Value) -> Env:
        return self.ring[value.lag].env if self.wavefront else self._env

    def _write(self, value: Value, tensor: torch.Tensor) -> None:
        if self.wavefront:
            entry = self.ring[value.lag]
            entry.h[value.key] = tensor
            self._written.append((entry, value.key))
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
        leaf = self.units.tree.leaves[task.unit.id - 1].id
        self._write(task.writes[0], self.units.run_node(leaf, self._need(value), self._env_of(value)))

    @torch.no_grad()
    def _coupler_forward(self, task: Task) -> None:
        (value,) = task.reads
        self._write(task.writes[0], self._coupled(task.unit.id, value, self._env_of(value)))

    @torch.no_grad()
    def _correct(self, task: Task) -> None:
        """Parareal: ``new_b = C_v(new_a) + f_b(old_{b-1}) − C_v(old_a)``."""
        node = task.unit.id
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
        self._backward(task, loss.total, trainable(self.units, task), h, y)
        self._record(task, loss.task, out)

    _head_update = _block_update  # DGL: block i and its head, trained by the head's loss alone

    def _coupler_update(self, task: Task) -> None:
        node = task.unit.id
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
        self._backward(task, loss.total, trainable(self.units, task), h_a, y)

    def _bp_forward(self, task: Task) -> None:
        i = task.unit.id
        h = self._need(task.reads[0])
        leaf = h.detach().requires_grad_() if i > 1 else None
        out = self.units.run_block(i, leaf if leaf is not None else h, self._env)
        self._bp[i] = (leaf, out)
        if self.units.emission is not None:
            self._emitted[i] = (self.units.emitted(i, self._env), None)
        self._write(task.writes[0], out)

    def _bp_backward(self, task: Task) -> None:
        """Block i's backward; it also fills ``leaf.grad``, the gradient the next backward task reads. With
        an emission, block N's task scores the concatenated outputs of every chunk and hands each chunk the
        gradient of its own, and block i backpropagates both its state's and its outputs' gradients."""
        i = task.unit.id
        leaf, out = self._bp[i]
        x, y = self._values[Value.batch("x")], self._values[Value.batch("y")]
        roots: list[torch.Tensor] = []
        grads: list[torch.Tensor | None] = []
        if i == self.units.tree.n_blocks:
            emission = self.units.emission
            if emission is None:
                loss = self.units.score(out, y)
                roots, grads = [loss], [None]
            else:
                emitted = [self._emitted[j][0] for j in sorted(self._emitted)]
                loss = self.units.score(torch.cat(emitted, emission.dim), y)
                self._emitted = {j: (e, g) for j, e, g in zip(sorted(self._emitted), emitted,
                                                              torch.autograd.grad(loss, emitted))}
            self._losses[i] = loss
        else:
            roots, grads = [out], [self._need(task.reads[1])]
        if i in self._emitted:
            roots.append(self._emitted[i][0])
            grads.append(self._emitted[i][1])
        torch.autograd.backward(roots, grads)
        last = self._losses.get(i)
        self._checks.append(_Check(task, None if last is None else last.detach(),
                                   list(self.units.blocks[i - 1].parameters()), x, y))
        if task.writes and leaf is not None and leaf.grad is not None:
            self._write(task.writes[0], leaf.grad)

    def _backward(
        self, task: Task, loss: torch.Tensor, params: list[torch.nn.Parameter], h: torch.Tensor, y: torch.Tensor
    ) -> None:
        """Backward into ``params`` only; the loss and gradients are checked once, at the end of the step."""
        _backward(loss, params)
        self._checks.append(_Check(task, loss.detach(), params, h, y))

    def _check_finite(self) -> None:
        """Raise :meth:`_nonfinite` for the first update whose loss or gradient is not finite. One
        device-to-host read for the whole step; the per-task search runs only after a failure."""
        flags = [c.loss.isfinite() for c in self._checks if c.loss is not None]
        flags += [p.grad.isfinite().all() for c in self._checks for p in c.params if p.grad is not None]
        if not flags or bool(torch.stack(flags).all()):
            return
        for c in self._checks:
            if c.loss is not None and not bool(c.loss.isfinite()):
                raise self._nonfinite(c.task, "loss", c.h, c.y)
            if not _finite_grads(c.params):
                raise self._nonfinite(c.task, "gradient", c.h, c.y)

    def _nonfinite(self, task: Task, what: str, h: torch.Tensor, y: torch.Tensor) -> NonFiniteError:
        """The error for a non-finite loss or gradient of ``task``, naming what was non-finite."""
        unit = f"{task.unit}" + (f" (with {task.head})" if task.head is not None else "")
        causes = [name for name, t in (("its input", h), ("the target", y))
                  if t.is_floating_point() and not bool(t.isfinite().all())]
        weights = [p for p in trainable(self.units, task) if not bool(p.isfinite().all())]
        if weights:
            causes.append(f"{len(weights)} of its weight tensors")
        why = (f"{' and '.join(causes)} {'are' if len(causes) > 1 or weights else 'is'} non-finite" if causes else
               "its input, target and weights are finite, so the computation overflowed")
        return NonFiniteError(
            f"non-finite {what} in {unit} at step {self.steps}: {why}; no gradient of this step was kept",
            node=unit,
            remedy="check the batch for NaN/inf; lower the learning rate or clip gradients if the weights "
            "diverged; fit(..., on_nonfinite='skip') skips such batches",
        )

    def _record(self, task: Task, loss: torch.Tensor, out: torch.Tensor) -> None:
        """Keep an update's task loss and write its detached output (wavefront: ``h{i}@next``)."""
        self._losses[task.unit.id] = loss
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
                params += list(self.units.heads[str(r.task.unit.id)].parameters())
            self._record(r.task, loss.task, out_r)
        _backward(torch.stack(totals).sum(), params)
        stack.hand_out_grads(members)
        self._checks += [_Check(r.task, total.detach(), trainable(self.units, r.task), r.h, r.y)
                         for r, total in zip(ready, totals)]


def _work_items(stage: Stage, stacks: dict[tuple[int, ...], StackedBlocks]) -> list[Task | _Group]:
    """``stage`` as the executor runs it: each batching group with at least two block updates in the
    stage runs as one item, where its first member stands; every other task is an item of its own."""
    updates = {t.unit.id: t for t in stage if t.kind is TaskKind.BLOCK_UPDATE}
    group_of: dict[Task, _Group] = {}
    for blocks, stack in stacks.items():
        members = tuple(j for j, i in enumerate(blocks) if i in updates)
        if len(members) > 1:
            group = _Group(stack, tuple(updates[blocks[j]] for j in members), members)
            group_of.update((task, group) for task in group.tasks)
    items: list[Task | _Group] = []
    for task in stage:
        if task not in group_of:
            items.append(task)
        elif task is group_of[task].tasks[0]:
            items.append(group_of[task])
    return items


def _finite_grads(params: Iterable[torch.Tensor]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    return not grads or bool(torch.stack([g.isfinite().all() for g in grads]).all())


def _backward(loss: torch.Tensor, params: Iterable[torch.Tensor]) -> None:
    """Backward into ``params`` only: nothing else on the graph receives a gradient."""
    wanted = [p for p in dict.fromkeys(params) if p.requires_grad]
    if wanted and loss.requires_grad:
        torch.autograd.backward(loss, inputs=wanted)
