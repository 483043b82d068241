"""Single-device interpreter of a :class:`~hbll_compile.runtime.schedule.Schedule`.

One :meth:`Executor.step` runs the stages in order and the tasks of a stage one after another, filling
``.grad`` of every unit by its local objective; the caller's optimizer steps afterwards. Tasks of one
stage are independent, so a batched or multi-device executor may run them together: it only needs to
implement the same per-kind handlers.

With ``HBLLConfig(executor="batched")`` the block updates of structurally identical blocks in one stage
run as one vmapped forward and one backward over stacked parameters (:mod:`~hbll_compile.runtime.batching`);
everything else, and any member whose input differs in shape from the others, runs in the loop.

Wavefront schedules read values of earlier steps; the executor keeps them in a ring of the N+1 most
recent batches (see :func:`~hbll_compile.runtime.schedule.value_source`). Tasks whose inputs are not
there yet (the first N-1 steps) are skipped.

Example:
    >>> import torch, hbll_compile as hc
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> m = hc.hbll_compile(net, (torch.randn(2, 4),), blocks=2, loss=torch.nn.functional.cross_entropy)
    >>> loss = m.training_step(torch.randn(5, 4), target=torch.tensor([0, 1, 2, 0, 1]))
    >>> loss.shape, net[0].weight.grad is not None
    (torch.Size([]), True)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from hbll_compile.runtime.batching import BatchPlan, StackedBlocks, batch_key, plan_batching, stack_context
from hbll_compile.runtime.objectives import Env, Units, coupler_loss, head_loss, path_loss
from hbll_compile.runtime.schedule import Schedule, Stage, Task, value_source


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
        self._values: dict[str, Any] = {}
        self._env: Env = {}
        self._memo: dict[tuple[int, str], torch.Tensor] = {}
        self._bp: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}
        self._losses: dict[int, torch.Tensor] = {}
        # a head whose block is updated in the same stage joins that update: one forward, one backward
        self._head_of = {t.unit[1]: t for stage in schedule.stages for t in stage if t.kind == "head_update"}
        self._fused = [{t.unit[1] for t in stage if t.kind == "block_update"} for stage in schedule.stages]
        self.batching: BatchPlan | None = plan_batching(units.blocks) if units.config.executor == "batched" else None
        """Which blocks run as one vmap under ``executor="batched"`` (None for the loop executor)."""
        groups = self.batching.groups if self.batching else ()
        self.stacks = {
            group: StackedBlocks([units.blocks[i - 1] for i in group], units.specs[group[0] - 1].context)
            for group in groups
        }
        """The stacked parameters of each group, by its blocks."""
        self._grouped = [_group_tasks(stage, self.stacks) for stage in schedule.stages]

    def reset(self) -> None:
        """Forget the wavefront pipeline (e.g. after changing the weights by hand)."""
        self.ring.clear()

    # -- one step --------------------------------------------------------------------------------
    def step(self, inputs: tuple[torch.Tensor, ...], target: torch.Tensor) -> torch.Tensor:
        """Run one training step; returns the task loss of the deepest block that ran (detached)."""
        env = self.units.environment(*inputs)
        if self.wavefront:
            self.ring.appendleft(_Batch(inputs[0], target, env))
        self._values = {"x": inputs[0], "y": target}
        self._env, self._memo, self._bp, self._losses = env, {}, {}, {}
        for stage, fused, grouped in zip(self.schedule.stages, self._fused, self._grouped):
            for task in stage:
                if task.kind == "head_update" and task.unit[1] in fused:
                    continue  # added to the block's own update
                if task in grouped:
                    if task == grouped[task].tasks[0]:  # the group runs where its first member would
                        self._block_updates(grouped[task])
                    continue
                handler = getattr(self, f"_{task.kind}")
                if task.kind == "block_update":
                    handler(task, self._head_of.get(task.unit[1]))
                else:
                    handler(task)
        if not self._losses:
            return torch.tensor(float("nan"))
        return self._losses[max(self._losses)].detach()

    # -- value plumbing --------------------------------------------------------------------------
    def _read(self, name: str) -> Any:
        if not self.wavefront:
            return self._values.get(name)
        key, lag = value_source(name)
        if lag >= len(self.ring):
            return None
        batch = self.ring[lag]
        return batch.x if key == "x" else batch.y if key == "y" else batch.h.get(key)

    def _env_of(self, name: str) -> Env:
        if not self.wavefront:
            return self._env
        return self.ring[value_source(name)[1]].env

    def _write(self, name: str, value: torch.Tensor) -> None:
        if self.wavefront:
            key, lag = value_source(name)
            self.ring[lag].h[key] = value
        else:
            self._values[name] = value

    def _coupled(self, node: int, name: str, h: torch.Tensor, env: Env) -> torch.Tensor:
        """C_v applied to the value called ``name``, computed once per step."""
        key = (node, name)
        if key not in self._memo:
            self._memo[key] = self.units.run_coupler(node, h, env)
        return self._memo[key]

    # -- handlers, one per task kind ---------------------------------------------------------------
    @torch.no_grad()
    def _block_forward(self, task: Task) -> None:
        h = self._read(task.reads[0])
        leaf = self._leaf(task.unit[1])
        self._write(task.writes[0], self.units.run_node(leaf, h, self._env_of(task.reads[0])))

    @torch.no_grad()
    def _coupler_forward(self, task: Task) -> None:
        (name,) = task.reads
        env = self._env_of(name)
        self._write(task.writes[0], self._coupled(task.unit[1], name, self._read(name), env))

    @torch.no_grad()
    def _correct(self, task: Task) -> None:
        """Parareal: ``new_b = C_v(new_a) + f_b(old_{b-1}) − C_v(old_a)``."""
        node = task.unit[1]
        new_a, old_last, old_a = task.reads
        env = self._env_of(new_a)
        b = self.units.tree.nodes[node].span[1]
        fine = self.units.run_node(self._leaf(b), self._read(old_last), env)
        coarse_new = self._coupled(node, new_a, self._read(new_a), env)
        coarse_old = self._coupled(node, old_a, self._read(old_a), env)
        self._write(task.writes[0], coarse_new + fine - coarse_old)

    def _block_update(self, task: Task, head: Task | None) -> None:
        i = task.unit[1]
        h_name, y_name = task.reads
        h, y = self._read(h_name), self._read(y_name)
        if h is None or y is None:
            return  # wavefront warm-up: this block's batch has not arrived yet
        env = self._env_of(h_name)
        out = self.units.run_block(i, h.detach(), env)
        loss, total, head_params = self._local_loss(task, head, out, y, env)
        _backward(total, [*self.units.blocks[i - 1].parameters(), *head_params])
        self._record(task, loss, out)

    def _block_updates(self, group: _Group) -> None:
        """The block updates of one group: members whose inputs are there and alike (shape, context) run
        as one vmap; a member alike to no other runs in the loop (e.g. the smaller last batch of an epoch
        in wavefront mode)."""
        alike: dict[Hashable, list[_Ready]] = {}
        for member, task in zip(group.members, group.tasks):
            h_name, y_name = task.reads
            h, y = self._read(h_name), self._read(y_name)
            if h is None or y is None:
                continue  # wavefront warm-up: this block's batch has not arrived yet
            env = self._env_of(h_name)
            key = batch_key(h, [env[name] for name in group.stack.context])
            alike.setdefault(key, []).append(_Ready(member, task, h, y, env))
        for ready in alike.values():
            if len(ready) == 1:
                self._block_update(ready[0].task, self._head_of.get(ready[0].task.unit[1]))
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
            loss, total, head_params = self._local_loss(r.task, self._head_of.get(r.task.unit[1]), out_r, r.y, r.env)
            totals.append(total)
            params += head_params
            self._record(r.task, loss, out_r)
        _backward(torch.stack(totals).sum(), params)
        stack.hand_out_grads(members)

    def _local_loss(
        self, task: Task, head: Task | None, out: torch.Tensor, y: torch.Tensor, env: Env
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.nn.Parameter]]:
        """Block i's path loss, that loss plus its fused head's weighted loss, and the head's parameters."""
        i = task.unit[1]
        loss = path_loss(self.units, task.path, out, y, env)
        if head is None:
            return loss, loss, []
        total = loss + self.units.config.local_head_weight * head_loss(self.units, i, out, y)
        return loss, total, list(self.units.heads[str(i)].parameters())

    def _record(self, task: Task, loss: torch.Tensor, out: torch.Tensor) -> None:
        """Keep a block update's loss and write its detached output (wavefront: ``h{i}@next``)."""
        self._losses[task.unit[1]] = loss
        if task.writes:
            self._write(task.writes[0], out.detach())

    def _coupler_update(self, task: Task) -> None:
        node = task.unit[1]
        a_name, t_name, y_name = task.reads
        h_a, h_t, y = self._read(a_name), self._read(t_name), self._read(y_name)
        if h_a is None or h_t is None or y is None:
            return
        env = self._env_of(a_name)
        if self.wavefront:
            target = h_t
        else:  # the estimate v's children produce: its right child applied to the split estimate
            with torch.no_grad():
                target = self.units.run_node(self.units.tree.nodes[node].children[1], h_t, env)
        loss = coupler_loss(self.units, node, task.path, h_a.detach(), target, y, env)
        _backward(loss, self.units.couplers[str(node)].parameters())

    def _head_update(self, task: Task) -> None:
        """DGL: block i and its head trained by the head's loss alone."""
        i = task.unit[1]
        h_name, y_name = task.reads
        h, y = self._read(h_name), self._read(y_name)
        env = self._env_of(h_name)
        out = self.units.run_block(i, h.detach(), env)
        loss = head_loss(self.units, i, out, y)
        _backward(loss, [*self.units.blocks[i - 1].parameters(), *self.units.heads[str(i)].parameters()])
        self._losses[i] = loss

    def _bp_forward(self, task: Task) -> None:
        i = task.unit[1]
        h = self._read(task.reads[0])
        leaf = h.detach().requires_grad_() if i > 1 else None
        out = self.units.run_block(i, leaf if leaf is not None else h, self._env)
        self._bp[i] = (leaf, out)
        self._write(task.writes[0], out)

    def _bp_backward(self, task: Task) -> None:
        i = task.unit[1]
        leaf, out = self._bp[i]
        if i == self.units.tree.n_blocks:
            loss = self.units.task_loss(out, self._read(task.reads[1]))
            loss.backward()
            self._losses[i] = loss
        else:
            out.backward(self._read(task.reads[1]))
        if task.writes:
            self._write(task.writes[0], leaf.grad)

    def _leaf(self, block: int) -> int:
        return self.units.tree.leaves[block - 1].id


def _group_tasks(stage: Stage, stacks: dict[tuple[int, ...], StackedBlocks]) -> dict[Task, _Group]:
    """Each block update of ``stage`` whose group has at least two updates in it -> that group's updates."""
    updates = {t.unit[1]: t for t in stage if t.kind == "block_update"}
    grouped: dict[Task, _Group] = {}
    for blocks, stack in stacks.items():
        members = tuple(j for j, i in enumerate(blocks) if i in updates)
        if len(members) > 1:
            group = _Group(stack, tuple(updates[blocks[j]] for j in members), members)
            grouped.update((task, group) for task in group.tasks)
    return grouped


def _backward(loss: torch.Tensor, params: Iterable[torch.Tensor]) -> None:
    """Backward into ``params`` only: nothing else on the graph receives a gradient."""
    trainable = [p for p in dict.fromkeys(params) if p.requires_grad]
    if trainable and loss.requires_grad:
        torch.autograd.backward(loss, inputs=trainable)
