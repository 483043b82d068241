"""Distributed HBLL on ``torch.distributed`` (DESIGN §7): each rank runs its share of the wavefront step.

``dm = hc.distribute(m)`` in a script launched with ``torchrun --nproc-per-node R`` returns a
:class:`DistributedHBLL`. Every rank builds the same compiled model ``m`` and calls
``dm.training_step(x, target=y)`` with the same batch; ``dm.parameters()`` are the units this rank owns,
so any torch optimizer works unchanged.

Rules:

- **Placement.** Blocks are cut into R contiguous groups by the exact min-max partition of their
  per-sample FLOPs (:func:`~hbll_compile.passes.partition.choose_cuts`, every cut legal). A local head
  lives with its block, a coupler with the block at its span's right end (its update reads ``h_b`` of
  that block), the output tail with block N.
- **Activations travel forward only.** The wavefront step is one stage whose every read was written
  on an earlier step, so a boundary ``h_j`` written at step t is sent (``isend``) at the end of step t
  to every rank whose tasks read it, and received (``irecv``) before step t+1 runs. Each message is a
  small header (step counter, shape, dtype, presence) followed by the tensor.
- **Replicas.** A rank's path losses evaluate units other ranks own (sibling leaves, couplers, the
  tail) as frozen maps. Their tensors (parameters and buffers) are sent by their owner every
  ``sync_every`` steps, before the step's compute; with ``sync_every=1`` every update sees the weights
  after the previous optimizer step, exactly as in one process. With ``sync_every=k > 1`` the refresh
  posted at the start of step t is applied when step t's compute is done, so the transfer overlaps it.
- **Weight prediction.** ``with hc.predicted_weights(dm, optimizer, hc.default_lead(dm))`` around
  ``dm.training_step`` moves this rank's blocks ahead; the refresh at the start of the step sends the
  moved weights, so with ``sync_every=1`` the replicas move with their owners and a run equals the
  single-process run with prediction (``fit``'s default).
- **Tied weights.** A tensor held by units on several ranks (a GPT's embedding and output head) is
  owned by all of them; after each step its owners exchange gradients and each sums them in rank
  order, so identical optimizers keep the copies identical. No other gradient ever crosses a rank.
- **Faults.** Every wait has a timeout. A rank that raises records itself as failed in the process
  group's store; a rank whose wait fails or times out records the rank whose process on this host is
  gone, else the peer it waited on (unless a failure was already recorded), and raises
  :class:`~hbll_compile.errors.DistributedError` naming the recorded rank. Under torchrun, whose agent
  stops every rank with SIGTERM when one fails, that signal raises the same error (a second SIGTERM
  gets the previous handler). After a failure the object refuses further steps.

Only HBLL in wavefront mode (``HBLLConfig(objective="hbll", inputs="wavefront")``, the default)
distributes: tree mode has dependent stages inside a step.

Example (placement only; a run needs torchrun):
    >>> import torch, hbll_compile as hc
    >>> net = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(6)])
    >>> m = hc.hbll_compile(net, (torch.randn(2, 8),), blocks=6, loss=torch.nn.functional.mse_loss)
    >>> p = place(m, ranks=4)
    >>> p.first, p.last, p.owner(m)(Unit.coupler(0))
    ((1, 3, 5, 6), (2, 4, 5, 6), 3)
    >>> plans = plan(m, p)
    >>> plans[1].boundaries  # block 3 reads h2; a coupler ending in rank 1's blocks reads h1
    {0: (1, 2)}
    >>> sorted(plans[0].replicas)  # ranks whose units rank 0's path losses evaluate
    [1, 3]
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from hbll_compile._util import first_line
from hbll_compile.config import HBLLConfig
from hbll_compile.errors import DistributedError
from hbll_compile.passes.partition import choose_cuts
from hbll_compile.runtime.executor import Executor
from hbll_compile.runtime.schedule import Carry, Task, TaskKind, Unit, UnitKind, Value

if TYPE_CHECKING:  # the runtime does not import the model layer; this is for type checkers only
    from hbll_compile.model import HBLLModel

__all__ = ["DistributedHBLL", "Placement", "RankPlan", "distribute", "place", "plan"]

_TAG_HEADER, _TAG_H, _TAG_STATE, _TAG_GRAD = 11, 12, 13, 14
"""Point-to-point tags: messages of one kind between two ranks arrive in the order they were sent."""
_MAX_DIMS = 8
_SLOT = 3 + _MAX_DIMS
"""Header slot of one boundary: present, dtype code, ndim, dims."""
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool)
_FAILED = "hbll_compile/failed"
"""Store key holding ``"<rank>|<reason>"`` of the first failure anyone recorded."""
_GRACE_S = 0.5
"""How long a rank whose wait failed looks for a root cause another rank recorded before blaming its peer."""


@dataclass(frozen=True)
class Placement:
    """Which rank runs what: rank r owns blocks ``first[r]..last[r]`` (1-based, contiguous), their heads,
    and the couplers whose span ends in that range."""

    first: tuple[int, ...]
    last: tuple[int, ...]
    flops: tuple[float, ...]
    """Per-sample FLOPs of each rank's blocks."""

    @property
    def ranks(self) -> int:
        return len(self.first)

    def block_rank(self, i: int) -> int:
        """The rank that owns block i."""
        return next(r for r, last in enumerate(self.last) if i <= last)

    def owner(self, m: HBLLModel) -> Callable[[Unit], int]:
        """``owner(unit)``: the rank that owns a unit of ``m`` (a coupler: the rank of its span's right end)."""
        right_end = {v.id: v.span[1] for v in m.tree.nodes}

        def rank_of(unit: Unit) -> int:
            return self.block_rank(right_end[unit.id] if unit.kind is UnitKind.COUPLER else unit.id)

        return rank_of


def place(m: HBLLModel, ranks: int) -> Placement:
    """Contiguous block groups, one per rank, minimising the largest group's per-sample FLOPs exactly.

    Raises:
        DistributedError: more ranks than blocks.
    """
    n = len(m.blocks)
    if not 1 <= ranks <= n:
        raise DistributedError(f"{ranks} ranks cannot share {n} blocks: every rank needs at least one block",
                               node="world_size", remedy=f"compile with blocks >= {ranks}, or launch at most {n} ranks")
    costs = [max(1, round(spec.sample_flops)) for spec in m.specs]
    cuts = choose_cuts(costs, list(range(1, n)), ranks, [True] * n).cuts  # every block owns a parameter
    bounds = (0, *cuts, n)
    return Placement(
        first=tuple(a + 1 for a in bounds[:-1]),
        last=tuple(bounds[1:]),
        flops=tuple(float(sum(s.sample_flops for s in m.specs[a:b])) for a, b in zip(bounds, bounds[1:])),
    )


@dataclass(frozen=True)
class RankPlan:
    """What one rank owns and receives each step (a pure function of the model and the placement)."""

    owned: list[str]
    """Canonical state-dict names of the tensors of its units (tied ones are owned by every holder)."""
    boundaries: dict[int, tuple[int, ...]]
    """Producer rank -> the boundaries j its tasks read from that rank."""
    replicas: dict[int, list[str]]
    """Sender rank -> the tensors it needs as frozen replicas (sender: the lowest-ranked owner)."""
    replica_bytes: int

    def describe_boundaries(self) -> str:
        return "; ".join(f"h{','.join(map(str, js))} from {p}" for p, js in sorted(self.boundaries.items())) or "-"

    def describe_replicas(self) -> str:
        return "; ".join(f"{len(names)} tensors from {p}" for p, names in sorted(self.replicas.items())) or "-"


def plan(m: HBLLModel, placement: Placement) -> list[RankPlan]:
    """Every rank's :class:`RankPlan`: which boundaries its tasks read from which rank, and which tensors
    of units other ranks own its updates evaluate (its unit, fused head, path, and the block 1 or tail
    a coupler runs)."""
    owner = placement.owner(m)
    names, tensors, owners = _tensor_owners(m, placement)
    order = list(names.values())
    needs: list[set[str]] = [set() for _ in range(placement.ranks)]
    reads: list[dict[int, set[int]]] = [{} for _ in range(placement.ranks)]
    for task in m.schedule.tasks():
        r = owner(task.unit)
        for value in task.reads:
            if value.name == "h" and value.boundary is not None and placement.block_rank(value.boundary) != r:
                reads[r].setdefault(placement.block_rank(value.boundary), set()).add(value.boundary)
        needs[r] |= {names[id(t)] for t in _task_tensors(m, task) if id(t) in names}
    plans = []
    for r in range(placement.ranks):
        replicas: dict[int, list[str]] = {}
        for name in order:
            if name in needs[r] and r not in owners[name]:
                replicas.setdefault(min(owners[name]), []).append(name)
        plans.append(RankPlan(
            owned=[n for n in order if r in owners[n]],
            boundaries={p: tuple(sorted(js)) for p, js in sorted(reads[r].items())},
            replicas=replicas,
            replica_bytes=sum(tensors[n].numel() * tensors[n].element_size() for ns in replicas.values() for n in ns),
        ))
    return plans


class _Pending:
    """One posted point-to-point operation and what it was for (named in a failure)."""

    def __init__(self, work: Any, peer: int, what: str) -> None:
        self.work, self.peer, self.what = work, peer, what


class DistributedHBLL(nn.Module):
    """This rank's share of an :class:`~hbll_compile.model.HBLLModel`'s wavefront training step.

    Build it with :func:`distribute`. ``parameters()`` yields the tensors of the units this rank owns;
    ``training_step`` returns the task loss of the deepest block this rank ran (on the last rank, what
    ``m.training_step`` returns in one process once the pipeline is full).
    """

    model: HBLLModel

    def __init__(self, model: HBLLModel, placement: Placement, *, sync_every: int, timeout: float) -> None:
        super().__init__()
        object.__setattr__(self, "model", model)  # not a submodule: parameters() is this rank's share only
        self.placement = placement
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.sync_every, self.timeout = sync_every, timedelta(seconds=timeout)
        self._device = next(iter(model.state_dict().values())).device
        self._comm = torch.device("cpu") if dist.get_backend() == "gloo" else self._device
        self._store = _default_store()
        self._owner = placement.owner(model)
        self._executor = Executor(model.schedule, model, owns=lambda task: self._owner(task.unit) == self.rank)
        self._executor.load_pipeline_state({k.removeprefix("pipeline."): v for k, v in model.state_dict().items()
                                            if k.startswith("pipeline.")})  # continue where m stands
        self._names, self._tensors, self._owners = _tensor_owners(model, placement)
        self._canonical = {name: self._names[id(t)] for name, t in model.state_dict(keep_vars=True).items()
                           if id(t) in self._names and name != self._names[id(t)]}
        self._plan_exchanges()
        self._incoming: list[tuple[int, tuple[int, ...], torch.Tensor, _Pending]] = []
        self._sends: list[_Pending] = []
        self._refresh: list[tuple[list[torch.Tensor], torch.Tensor, _Pending]] = []
        self._broken: str | None = None
        self._check_same_model()
        self._previous_sigterm: Any = signal.SIG_DFL
        if "TORCHELASTIC_RUN_ID" in os.environ and threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_launcher_stop)
        self._post_refresh()
        self._apply_refresh()

    def _plan_exchanges(self) -> None:
        """This rank's sends are the other ranks' receives from it: every rank computes every plan."""
        me = self.rank
        self.plans = plan(self.model, self.placement)
        mine = self.plans[me]
        self._h_in, self._state_in = mine.boundaries, mine.replicas
        self._h_out = {q: p.boundaries[me] for q, p in enumerate(self.plans) if me in p.boundaries}
        self._state_out = {q: p.replicas[me] for q, p in enumerate(self.plans) if me in p.replicas}
        self._tied = [n for n in mine.owned if len(self._owners[n]) > 1 and isinstance(self._tensor(n), nn.Parameter)]
        self._owned = mine.owned

    def _tensor(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    @property
    def config(self) -> HBLLConfig:
        """The compiled model's configuration."""
        return self.model.config

    @property
    def blocks(self) -> nn.ModuleList:
        """All N blocks: this rank's own, and its frozen replicas of the others' (what
        :func:`~hbll_compile.runtime.prediction.predicted_weights` reads: it moves only the parameters the
        optimizer steps, this rank's, and the next refresh hands the moved weights to the replicas)."""
        return self.model.blocks

    # -- the user's loop ----------------------------------------------------------------------------
    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        """The parameters of the units this rank owns, named as in ``m.named_parameters()``."""
        for name in self._owned:
            t = self._tensors[name]
            if isinstance(t, nn.Parameter):
                yield prefix + name, t

    def train(self, mode: bool = True) -> DistributedHBLL:
        self.model.train(mode)
        return super().train(mode)

    def training_step(self, *inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """This rank's tasks of one wavefront step on the batch ``(inputs, target)``, which every rank
        passes alike; fills ``.grad`` of this rank's units (tied weights summed across their owners).
        Call ``optimizer.step()`` on ``dm.parameters()`` afterwards.

        Raises:
            DistributedError: another rank failed or stopped answering (the message names it), or this
                object already saw a failure.
        """
        with self._guard():
            self._receive_boundaries()
            self._wait(self._sends, "finishing sends of the previous step")
            self._sends = []
            if self._executor.steps % self.sync_every == 0:
                self._post_refresh()
            if self.sync_every == 1:
                self._apply_refresh()
            loss = self._executor.step(inputs, target)
            self._sum_tied_grads()
            self._send_boundaries()
            if self.sync_every > 1:
                self._apply_refresh()
        return loss

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """Refuse to go on after a failure; record this rank as the failed one when it raises."""
        if self._broken is not None:
            raise DistributedError(f"this distributed run already failed: {self._broken}", node=f"rank {self.rank}",
                                   remedy="restart every rank (e.g. from the last dm.save checkpoint)")
        try:
            yield
        except DistributedError as err:
            self._broken = str(err)
            raise
        except BaseException as err:
            self._broken = f"rank {self.rank} raised {type(err).__name__}: {first_line(err)}"
            self._record(self.rank, self._broken)
            raise

    # -- boundaries ----------------------------------------------------------------------------------
    def _send_boundaries(self) -> None:
        """Post this step's boundaries to the ranks that read them, and the header receives of the next."""
        for peer, js in self._h_out.items():
            tensors = [self._executor.read(Value.h(j, carry=Carry.NEXT)) for j in js]
            header = _header(self._executor.steps, tensors).to(self._comm)
            self._sends.append(self._isend(header, peer, _TAG_HEADER, "sending a boundary header"))
            self._sends += [self._isend(t.detach().to(self._comm).contiguous(), peer, _TAG_H, f"sending h{j}")
                            for j, t in zip(js, tensors) if t is not None]
        for peer, js in self._h_in.items():
            header = torch.empty(1 + _SLOT * len(js), dtype=torch.int64, device=self._comm)
            self._incoming.append((peer, js, header, self._irecv(header, peer, _TAG_HEADER, "receiving a header")))

    def _receive_boundaries(self) -> None:
        """Finish the receives posted at the end of the last step; each boundary lands in the ring entry
        of its batch (the same entry its producer wrote, before this step's shift)."""
        incoming, self._incoming = self._incoming, []
        landed: list[tuple[int, int, torch.Tensor, _Pending]] = []
        for peer, js, header, pending in incoming:
            self._wait([pending], pending.what)
            steps, specs = _parse_header(header.cpu(), len(js))
            if steps != self._executor.steps:
                raise self._desync(peer, f"its boundaries are from step {steps}, this rank is at step "
                                   f"{self._executor.steps}")
            for j, spec in zip(js, specs):
                if spec is not None:
                    buffer = torch.empty(spec[0], dtype=spec[1], device=self._comm)
                    landed.append((peer, j, buffer, self._irecv(buffer, peer, _TAG_H, f"receiving h{j}")))
        self._wait([p for *_, p in landed], "receiving boundaries")
        for peer, j, buffer, _ in landed:
            lag = Value.h(j, carry=Carry.NEXT).lag
            if lag >= len(self._executor.ring):
                raise self._desync(peer, f"h{j} arrived for a batch this rank does not hold")
            self._executor.ring[lag].h[f"h{j}"] = buffer.to(self._device)

    # -- replicas and tied gradients -----------------------------------------------------------------
    def _post_refresh(self) -> None:
        """Send owned tensors to the ranks that use them as frozen replicas; post the matching receives."""
        for peer, names in self._state_out.items():
            for group in _by_dtype([self._tensor(n) for n in names]):
                flat = torch.cat([t.detach().reshape(-1) for t in group]).to(self._comm)
                self._sends.append(self._isend(flat, peer, _TAG_STATE, "sending weights"))
        for peer, names in self._state_in.items():
            for group in _by_dtype([self._tensor(n) for n in names]):
                flat = torch.empty(sum(t.numel() for t in group), dtype=group[0].dtype, device=self._comm)
                self._refresh.append((group, flat, self._irecv(flat, peer, _TAG_STATE, "receiving weights")))

    def _apply_refresh(self) -> None:
        pending, self._refresh = self._refresh, []
        self._wait([p for *_, p in pending], "receiving weights")
        with torch.no_grad():
            for group, flat, _ in pending:
                for t, part in zip(group, flat.split([t.numel() for t in group])):
                    t.copy_(part.view_as(t))

    def _sum_tied_grads(self) -> None:
        """Every owner of a tied weight ends with the sum of all owners' gradients, added in rank order
        (None when no owner has one, as in one process before any of its users ran)."""
        for name in self._tied:
            p = self._tensor(name)
            owners = sorted(self._owners[name])
            mine = torch.cat([torch.ones(1, dtype=p.dtype, device=p.device) if p.grad is not None
                              else torch.zeros(1, dtype=p.dtype, device=p.device),
                              (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)]).to(self._comm)
            parts: dict[int, torch.Tensor] = {self.rank: mine}
            ops = []
            for peer in owners:
                if peer != self.rank:
                    ops.append(self._isend(mine, peer, _TAG_GRAD, f"sending the gradient of tied {name}"))
                    parts[peer] = torch.empty_like(mine)
                    ops.append(self._irecv(parts[peer], peer, _TAG_GRAD, f"receiving the gradient of tied {name}"))
            self._wait(ops, f"exchanging the gradient of tied {name}")
            total = None
            for r in owners:
                if bool(parts[r][0]):
                    g = parts[r][1:].view_as(p).to(p.device)
                    total = g if total is None else total + g
            p.grad = total

    # -- state -----------------------------------------------------------------------------------------
    def gather_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The full state dict of ``m`` (owned tensors from each owner, the wavefront ring merged from
        every rank) on rank 0, None on the others. Every rank must call it."""
        with self._guard():
            return self._gather()

    def _gather(self) -> dict[str, torch.Tensor] | None:
        self._receive_boundaries()
        self._wait(self._sends, "finishing sends")
        self._sends = []
        mine = {n: self._tensor(n).detach().cpu() for n in self._owned}
        pipeline = {f"pipeline.{k}": v.detach().cpu() for k, v in self._executor.pipeline_state().items()}
        gathered: list[Any] = [None] * self.world if self.rank == 0 else []
        try:
            dist.gather_object((mine, pipeline), gathered if self.rank == 0 else None, dst=0)
        except Exception as err:  # noqa: BLE001 - any transport failure names the failed rank
            raise self._failure(0 if self.rank else None, "gathering the state dict", err) from err
        if self.rank != 0:
            return None
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items() if not k.startswith("pipeline.")}
        for tensors, ring in gathered:
            state.update(tensors)
            state.update(ring)
        for alias, name in self._canonical.items():  # a tied weight appears under every name holding it
            state[alias] = state[name]
        return state

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the file :meth:`HBLLModel.save` writes (loadable with ``hc.HBLLModel.load``) on rank 0.
        Every rank must call it."""
        state = self.gather_state_dict()
        if state is not None:
            with self._guard():
                self.model.load_state_dict(state)
                self.model.save(path)

    # -- inspection ------------------------------------------------------------------------------------
    def describe(self) -> str:
        """A table: per rank, its blocks, FLOPs, couplers and heads, and what it receives from whom."""
        from rich.console import Console
        from rich.table import Table

        m, p = self.model, self.placement
        table = Table(title=f"HBLL on {p.ranks} ranks (this is rank {self.rank}), sync_every={self.sync_every}")
        for column in ("rank", "blocks", "FLOPs/sample", "couplers", "heads", "receives h", "replicas from"):
            table.add_column(column, justify="right" if column == "FLOPs/sample" else "left")
        for r in range(p.ranks):
            couplers = [str(v.id) for v in m.tree.internal_nodes if self._owner(Unit.coupler(v.id)) == r]
            heads = [k for k in m.heads.keys() if self._owner(Unit.head(int(k))) == r]
            blocks = f"{p.first[r]}" if p.first[r] == p.last[r] else f"{p.first[r]}..{p.last[r]}"
            table.add_row(str(r), blocks, f"{p.flops[r]:,.0f}", ", ".join(couplers) or "-", ", ".join(heads) or "-",
                          self.plans[r].describe_boundaries(), self.plans[r].describe_replicas())
        console = Console(width=140, record=True, file=io.StringIO())
        console.print(table)
        return console.export_text()

    # -- transport with timeouts and failure attribution -------------------------------------------------
    def _isend(self, tensor: torch.Tensor, peer: int, tag: int, what: str) -> _Pending:
        try:
            return _Pending(dist.isend(tensor, peer, tag=tag), peer, what)
        except Exception as err:  # noqa: BLE001
            raise self._failure(peer, what, err) from err

    def _irecv(self, tensor: torch.Tensor, peer: int, tag: int, what: str) -> _Pending:
        try:
            return _Pending(dist.irecv(tensor, peer, tag=tag), peer, what)
        except Exception as err:  # noqa: BLE001
            raise self._failure(peer, what, err) from err

    def _wait(self, pending: list[_Pending], what: str) -> None:
        for p in pending:
            try:
                p.work.wait(self.timeout)
            except Exception as err:  # noqa: BLE001 - a closed connection or a timeout: attribute it
                raise self._failure(p.peer, p.what or what, err) from err

    def _failure(self, peer: int | None, what: str, err: BaseException) -> DistributedError:
        """The error for a failed wait: the first failure any rank recorded, else ``peer`` (recorded now)."""
        culprit = self._recorded(_GRACE_S)
        if culprit is None:
            dead = self._dead_peer()
            blamed = dead if dead is not None else peer if peer is not None else -1
            reason = f"it stopped answering while rank {self.rank} was {what} ({first_line(err)})"
            self._record(blamed, reason)
            culprit = (blamed, reason)
        rank, reason = culprit
        who = f"rank {rank}" if rank >= 0 else "a rank"
        self._broken = f"{who} failed: {reason}"
        return DistributedError(f"{who} failed: {reason}; rank {self.rank} stops", node=who,
                                remedy="see that rank's own error; restart every rank (e.g. from the last "
                                "dm.save checkpoint)")

    def _desync(self, peer: int, reason: str) -> DistributedError:
        self._record(peer, reason)
        return DistributedError(f"rank {peer} is out of step with rank {self.rank}: {reason}", node=f"rank {peer}",
                                remedy="call dm.training_step on every rank with the same batches")

    def _record(self, rank: int, reason: str) -> None:
        """Record the first failure in the store (ignored when the store itself is gone)."""
        try:
            self._store.compare_set(_FAILED, "", f"{rank}|{reason}")
        except Exception:  # noqa: BLE001 - the store lived on the failed rank; peers then blame their peer
            pass

    def _dead_peer(self) -> int | None:
        """The first other rank whose process on this host is gone (or a zombie); None if none is known."""
        host = socket.gethostname()
        for r, (their_host, pid) in enumerate(self._processes):
            if r != self.rank and their_host == host:
                try:
                    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                except OSError:
                    return r
                if state in ("Z", "X"):
                    return r
        return None

    def _on_launcher_stop(self, signum: int, frame: object) -> None:
        """torchrun stops every rank (SIGTERM) when one fails: turn that into the DistributedError naming
        the failed rank; a second SIGTERM gets the previous handler."""
        signal.signal(signal.SIGTERM, self._previous_sigterm)
        recorded = self._recorded(0.0)
        rank = recorded[0] if recorded else self._dead_peer()
        who = f"rank {rank}" if rank is not None and rank >= 0 else "another rank"
        self._broken = f"{who} failed and torchrun stopped rank {self.rank}"
        raise DistributedError(self._broken + (f": {recorded[1]}" if recorded else ""), node=who,
                               remedy="see that rank's own error; restart every rank (e.g. from the last "
                               "dm.save checkpoint)")

    def _recorded(self, grace: float) -> tuple[int, str] | None:
        deadline = time.monotonic() + grace
        while True:
            try:
                if self._store.check([_FAILED]):
                    rank, reason = self._store.get(_FAILED).decode().split("|", 1)
                    return int(rank), reason
            except Exception:  # noqa: BLE001 - no store: nobody can have recorded anything
                return None
            if time.monotonic() > deadline:
                return None
            time.sleep(0.1)

    def _check_same_model(self) -> None:
        """Refuse ranks whose compiled models differ (tensor names, shapes, blocks); learn where each rank's
        process runs (host, pid), to tell which one died."""
        mine = (len(self.model.blocks), [(n, tuple(self._tensor(n).shape)) for n in self._names.values()])
        every: list[Any] = [None] * self.world
        try:
            dist.all_gather_object(every, (mine, (socket.gethostname(), os.getpid())))
        except Exception as err:  # noqa: BLE001
            raise self._failure(None, "comparing the compiled models", err) from err
        self._processes = [process for _, process in every]
        for r, (theirs, _) in enumerate(every):
            if theirs != mine:
                raise DistributedError(f"rank {r} compiled a different model than rank {self.rank}", node=f"rank {r}",
                                       remedy="build and compile the same model with the same blocks on every rank")


def distribute(m: HBLLModel, *, sync_every: int = 1, timeout: float = 30.0) -> DistributedHBLL:
    """This rank's share of ``m``'s wavefront training step; initialises the default process group from
    the torchrun environment when none exists (gloo on CPU; nccl on CUDA when every local rank has its
    own GPU, else gloo with transfers through the CPU). ``timeout`` (seconds) bounds every wait.

    Raises:
        DistributedError: no process group and no torchrun environment, a schedule that is not
            wavefront HBLL, a model that emits an output at every time step, bad ``sync_every``/``timeout``,
            more ranks than blocks, or ranks whose compiled models differ.
    """
    if m.emission is not None:
        raise DistributedError("the model emits an output at every time step; distributed runs carry only "
                               "boundaries and targets between ranks, not the chunks' outputs", node="output",
                               remedy="train it in one process (m.fit)")
    if m.config.objective != "hbll" or m.config.inputs != "wavefront":
        raise DistributedError(
            f"only wavefront HBLL distributes; this model trains with objective={m.config.objective!r}, "
            f"inputs={m.config.inputs!r}", node="config",
            remedy="compile with HBLLConfig(objective='hbll', inputs='wavefront') (the default)")
    if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
        raise DistributedError(f"sync_every must be a positive integer, got {sync_every!r}", node="sync_every",
                               remedy="pass sync_every=1 (exact) or a larger period")
    if not timeout > 0:
        raise DistributedError(f"timeout must be positive seconds, got {timeout!r}", node="timeout",
                               remedy="pass timeout=30.0")
    _init_group(m, timeout)
    return DistributedHBLL(m, place(m, dist.get_world_size()), sync_every=sync_every, timeout=timeout)


def _init_group(m: HBLLModel, timeout: float) -> None:
    if dist.is_initialized():
        return
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DistributedError(f"no process group and no torchrun environment ({', '.join(missing)} unset)",
                               node="process group",
                               remedy="launch with `torchrun --nproc-per-node R script.py`, or call "
                               "torch.distributed.init_process_group first")
    device = next(iter(m.state_dict().values())).device
    local_rank, local_world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    backend = "gloo"
    if device.type == "cuda":
        gpu = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(gpu)
        m.to(torch.device("cuda", gpu))
        backend = "nccl" if torch.cuda.device_count() >= local_world else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout))


def _default_store() -> Any:
    return dist.distributed_c10d._get_default_store()  # the rendezvous store every rank already reaches


def _unit_modules(m: HBLLModel, unit: Unit) -> list[nn.Module]:
    if unit.kind is UnitKind.BLOCK:
        return [m.blocks[unit.id - 1]]
    if unit.kind is UnitKind.HEAD:
        return [m.heads[str(unit.id)]]
    return [m.couplers[str(unit.id)]]


def _node_modules(m: HBLLModel, node: int) -> list[nn.Module]:
    """The modules ``m.run_node(node, ...)`` evaluates: a leaf's block, or a coupler with the blocks its plan
    runs before it (token inputs, copies) and the tail after it (spans ending at the output)."""
    tree_node = m.tree.nodes[node]
    if tree_node.is_leaf:
        return [m.blocks[tree_node.span[1] - 1]]
    plan = m.coupler_plan(node)
    return list(m.blocks[plan.span[0]:plan.source]) + [m.couplers[str(node)]] + (
        [m.tail] if plan.runs_tail else [])


def _task_tensors(m: HBLLModel, task: Task) -> list[torch.Tensor]:
    """Every parameter and buffer an update task evaluates: its unit (and head), and its path."""
    modules = _unit_modules(m, task.unit) + (_unit_modules(m, task.head) if task.head is not None else [])
    path = task.path
    if task.kind is TaskKind.COUPLER_UPDATE:
        modules = _node_modules(m, task.unit.id)
        path = task.path if m.config.coupler_path_weight else ()
    for node in path:
        modules += _node_modules(m, node)
    return [t for module in modules for t in (*module.parameters(), *module.buffers())]


def _tensor_owners(
    m: HBLLModel, placement: Placement
) -> tuple[dict[int, str], dict[str, torch.Tensor], dict[str, set[int]]]:
    """Canonical names of every unit tensor (its first state-dict name: the same order on every rank), the
    tensors by name, and the ranks owning a unit that holds each."""
    owner = placement.owner(m)
    names: dict[int, str] = {}
    for name, t in m.state_dict(keep_vars=True).items():
        if not name.startswith("pipeline."):
            names.setdefault(id(t), name)
    units = [Unit.block(i) for i in range(1, len(m.blocks) + 1)]
    units += [Unit.coupler(v.id) for v in m.tree.internal_nodes] + [Unit.head(int(k)) for k in m.heads.keys()]
    owners: dict[str, set[int]] = {}
    for unit in units:
        for module in _unit_modules(m, unit):
            for t in (*module.parameters(), *module.buffers()):
                if id(t) in names:  # a non-persistent buffer is no state: every rank recomputes it
                    owners.setdefault(names[id(t)], set()).add(owner(unit))
    tensors = {names[id(t)]: t for t in m.state_dict(keep_vars=True).values() if names.get(id(t)) in owners}
    return {i: n for i, n in names.items() if n in owners}, tensors, owners


def _by_dtype(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    return [groups[d] for d in sorted(groups, key=str)]


def _header(steps: int, tensors: list[torch.Tensor | None]) -> torch.Tensor:
    """Step counter, then per boundary: present, dtype code, ndim, dims (zero-padded)."""
    header = torch.zeros(1 + _SLOT * len(tensors), dtype=torch.int64)
    header[0] = steps
    for k, t in enumerate(tensors):
        if t is not None:
            if t.dim() > _MAX_DIMS or t.dtype not in _DTYPES:
                raise DistributedError(f"a boundary of shape {tuple(t.shape)} ({t.dtype}) cannot be sent",
                                       node=f"boundary {k}", remedy=f"use boundaries of at most {_MAX_DIMS} dims "
                                       f"and one of {', '.join(map(str, _DTYPES))}")
            base = 1 + _SLOT * k
            header[base:base + 3] = torch.tensor([1, _DTYPES.index(t.dtype), t.dim()])
            header[base + 3:base + 3 + t.dim()] = torch.tensor(t.shape)
    return header


def _parse_header(header: torch.Tensor, count: int) -> tuple[int, list[tuple[tuple[int, ...], torch.dtype] | None]]:
    specs: list[tuple[tuple[int, ...], torch.dtype] | None] = []
    for k in range(count):
        present, code, ndim, *dims = header[1 + _SLOT * k:1 + _SLOT * (k + 1)].tolist()
        specs.append((tuple(dims[:ndim]), _DTYPES[code]) if present else None)
    return int(header[0]), specs
