"""The gradient-fidelity instrument (DESIGN §2): how close each block's local gradient is to its exact
end-to-end (BP) gradient, and how well each coupler stands in for the span of blocks it replaces.

:func:`gradient_report` measures one batch at the current weights:

- **Block i**: the cosine and the norm ratio ``‖g_local‖ / ‖g_bp‖`` between the gradient of block i's
  local loss (the one the executor uses) and the gradient of ``ℓ(model(x), y)``, both with respect to
  all of block i's trainable parameters, flattened. Block i's input ``h_{i-1}`` is the one the
  configured mode gives this batch: the exact chain's under ``inputs="wavefront"`` (the pipeline
  carries exact activations, up to one step of staleness), the tree estimate after K corrections
  under ``inputs="tree"``, the exact chain's under ``"dgl"`` and ``"bp"``.
- **Coupler v** with span (a, b]: its consistency error ``‖C_v(h_a) − S_v(h_a)‖² / ‖S_v(h_a)‖²``
  against the exact span S_v on the exact ``h_a``, in the coupler's output space (``h_b``, or the
  model output when the tail finishes it), and the cosine between ``J_C^T u`` and ``J_S^T u`` for
  seeded probes ``u ~ N(0, 1)`` in that space, averaged, and for ``u = ∂ℓ/∂h_b``, the exact BP
  gradient there (random probes can overstate how well a coupler carries the one direction that
  matters). The vector-Jacobian products are taken at
  the boundary the coupler's learned part reads (``h_1`` for token inputs, which are not
  differentiable).

``paths="exact"`` replaces every coupler by the exact frozen chain of its span, in the paths and in
the tree estimate alike. Local gradients then equal the BP gradients (cosine 1 up to rounding) when
the objective is ``"hbll"`` without local heads (``local_head_weight=0``): the
instrument's self-check. A parameter shared by several blocks (tied weights) is compared with the
sum of the local gradients that reach it, which is what its ``.grad`` holds after a training step. Under ``"bp"`` the
local gradient *is* the BP gradient, so paths are always exact there.

The report leaves the model as it found it: weights, ``.grad`` (it uses ``torch.autograd.grad``),
buffers such as BatchNorm statistics (snapshotted and restored), the global RNG state, train/eval
mode and the wavefront pipeline. Random layers (dropout) draw the same numbers in every pass: each
block and the tail reseed the RNG from ``seed`` before they run, so BP and local gradients are
compared under common random numbers.

Example:
    >>> import torch, hbll_compile as hc
    >>> net = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh()) for _ in range(4)])
    >>> m = hc.hbll_compile(net, (torch.randn(2, 8),), blocks=4, loss=torch.nn.functional.mse_loss,
    ...                     config=hc.HBLLConfig(local_head_weight=0))
    >>> x, y = torch.randn(16, 8), torch.randn(16, 8)
    >>> exact = m.gradient_report(x, target=y, paths="exact")
    >>> all(abs(b.cosine - 1) < 1e-5 for b in exact.blocks)
    True
    >>> report = m.gradient_report(x, target=y)
    >>> [c.span for c in report.couplers], -1 <= report.mean_cosine <= 1
    ([(0, 4), (0, 2), (2, 4)], True)
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
import torch.fx as fx
from torch import nn

from hbll_compile.errors import TrainingError
from hbll_compile.ir import CouplerPlan, TreeNode
from hbll_compile.runtime.objectives import Env, Units, update_loss
from hbll_compile.runtime.schedule import Schedule, Task, TaskKind, Unit

__all__ = [
    "PATHS",
    "BlockFidelity",
    "CouplerFidelity",
    "GradientReport",
    "gradient_report",
    "plot_history",
    "plot_report",
]

PATHS = ("couplers", "exact")
"""What a block's path is made of: the learned couplers (what training uses), or the exact frozen
chain of blocks (the self-check)."""


class Diagnosable(Units, Protocol):
    """What the instrument needs of a compiled model (``HBLLModel`` implements it)."""

    input_names: tuple[str, ...]
    coupler_plans: list[CouplerPlan]
    tail: fx.GraphModule

    schedule: Schedule

    def coupler_plan(self, node: int) -> CouplerPlan: ...

    def run_block_frozen(self, i: int, h: torch.Tensor, env: Env) -> torch.Tensor: ...

    def run_tail(self, t: torch.Tensor, env: Env) -> torch.Tensor: ...

    def run_coupling(self, node: int, h: torch.Tensor, env: Env) -> torch.Tensor: ...

    def to_original(self) -> nn.Module: ...

    def buffers(self) -> Iterator[torch.Tensor]: ...

    def parameters(self) -> Iterator[nn.Parameter]: ...


@dataclass(frozen=True)
class BlockFidelity:
    """Block ``block``'s local gradient against its BP gradient. ``cosine`` and ``norm_ratio`` are
    ``None`` where they are undefined: a block without trainable parameters, or a zero gradient."""

    block: int
    cosine: float | None
    norm_ratio: float | None
    local_norm: float
    bp_norm: float
    path: tuple[tuple[int, int], ...]
    """Spans of the tree nodes the block's local loss went through, in order: a span of one block is
    that block run frozen, a longer one a coupler (or its exact span with ``paths="exact"``)."""


@dataclass(frozen=True)
class CouplerFidelity:
    """Coupler of tree node ``node`` against the exact span ``(a, b]`` it stands for.
    Cosines are ``None`` where a VJP is zero (for every probe)."""

    node: int
    span: tuple[int, int]
    consistency_error: float | None
    """``None`` where the exact span's output is zero (a relative error is undefined)."""
    vjp_cosine: float | None
    """Mean cosine of ``J_C^T u`` and ``J_S^T u`` over random probes ``u``."""
    grad_vjp_cosine: float | None
    """The same cosine for ``u = ∂ℓ/∂h_b``, the exact BP gradient at the coupler's output: the one
    direction a block's path gradient actually takes through it."""


@dataclass(frozen=True)
class GradientReport:
    """One batch's gradient fidelity: per block, then per coupler (tree order).

    Example:
        >>> blocks = (BlockFidelity(1, 0.5, 2.0, 2.0, 1.0, ((1, 2),)), BlockFidelity(2, 1.0, 1.0, 1.0, 1.0, ()))
        >>> r = GradientReport(blocks, (CouplerFidelity(0, (0, 2), 0.25, 0.75, 0.5),), "hbll", "exact chain",
        ...                    "couplers", 1.5, 4)
        >>> r.mean_cosine, round(r.global_cosine, 4), r.summary()["coupler_error"]
        (0.75, 0.6325, [0.25])
    """

    blocks: tuple[BlockFidelity, ...]
    couplers: tuple[CouplerFidelity, ...]
    objective: str
    inputs: str
    """Where block inputs came from: ``"exact chain"`` or the tree estimate after K corrections."""
    paths: str
    loss: float
    """The task loss of the exact chain on this batch."""
    probes: int

    @property
    def mean_cosine(self) -> float | None:
        """Mean of the defined block cosines (``None`` when none is defined)."""
        defined = [b.cosine for b in self.blocks if b.cosine is not None]
        return sum(defined) / len(defined) if defined else None

    @property
    def global_cosine(self) -> float | None:
        """Cosine of the whole update: every block's local gradient concatenated against every block's
        BP gradient (blocks weigh by their gradient norms; a tied parameter counts once per block
        holding it). ``None`` when either side is zero."""
        defined = [b for b in self.blocks if b.cosine is not None]
        dot = sum((b.cosine or 0.0) * b.local_norm * b.bp_norm for b in defined)
        norms = math.sqrt(sum(b.local_norm**2 for b in defined)) * math.sqrt(sum(b.bp_norm**2 for b in defined))
        return dot / norms if norms > 0 else None

    def summary(self) -> dict[str, Any]:
        """The numbers as lists in block and coupler order (what ``fit(diagnose_every=...)`` records)."""
        return {
            "mean_cosine": self.mean_cosine,
            "global_cosine": self.global_cosine,
            "block_cosine": [b.cosine for b in self.blocks],
            "block_norm_ratio": [b.norm_ratio for b in self.blocks],
            "coupler_span": [list(c.span) for c in self.couplers],
            "coupler_error": [c.consistency_error for c in self.couplers],
            "coupler_vjp_cosine": [c.vjp_cosine for c in self.couplers],
            "coupler_grad_vjp_cosine": [c.grad_vjp_cosine for c in self.couplers],
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-serialisable (``None`` for undefined values)."""
        return {**asdict(self), "mean_cosine": self.mean_cosine, "global_cosine": self.global_cosine}

    def table(self) -> str:
        """Two tables, blocks and couplers, rendered as text with rich."""
        from rich.console import Console
        from rich.table import Table

        header = (f"gradient fidelity: objective {self.objective}, inputs {self.inputs}, paths {self.paths}; "
                  f"task loss {self.loss:.4f}; mean block cosine {_fmt(self.mean_cosine)}, "
                  f"whole-update cosine {_fmt(self.global_cosine)}")
        blocks = Table(title="blocks: local gradient against BP gradient")
        for column in ("block", "path to the output", "cosine", "norm ratio", "‖g local‖", "‖g BP‖"):
            blocks.add_column(column, justify="left" if column.startswith("path") else "right")
        for b in self.blocks:
            path = " ".join(f"f{s[1]}" if s[1] - s[0] == 1 else f"C({s[0]},{s[1]}]" for s in b.path)
            blocks.add_row(str(b.block), path or "-", _fmt(b.cosine), _fmt(b.norm_ratio),
                           f"{b.local_norm:.3e}", f"{b.bp_norm:.3e}")
        couplers = Table(title=f"couplers against their exact spans ({self.probes} VJP probes)")
        for column in ("node", "span", "consistency error", "VJP cosine (probes)", "VJP cosine (BP gradient)"):
            couplers.add_column(column, justify="right")
        for c in self.couplers:
            error = "-" if c.consistency_error is None else f"{c.consistency_error:.3g}"
            couplers.add_row(str(c.node), f"({c.span[0]}, {c.span[1]}]", error,
                             _fmt(c.vjp_cosine), _fmt(c.grad_vjp_cosine))
        console = Console(file=io.StringIO(), width=120, record=True)
        console.print(header)
        console.print(blocks)
        console.print(couplers)
        return console.export_text()

    def __str__(self) -> str:
        return self.table()


def gradient_report(
    m: Diagnosable,
    inputs: Sequence[torch.Tensor],
    target: torch.Tensor,
    *,
    paths: str = "couplers",
    probes: int = 4,
    seed: int = 0,
) -> GradientReport:
    """Measure gradient fidelity on one batch (see the module docstring); the model is left untouched."""
    _check(m, inputs, paths, probes)
    objective = m.config.objective
    paths = "exact" if objective == "bp" else paths
    n = m.tree.n_blocks
    with _untouched(m, seed):
        env = m.environment(*inputs, target=target)
        chain, bp_grads, boundary_grads, loss = _exact_chain(m, tuple(inputs), target, env)
        tree_inputs = objective == "hbll" and m.config.inputs == "tree"
        starts = _tree_estimate(m, chain[0], env, paths) if tree_inputs else chain[:n]
        blocks = _block_fidelities(m, starts, target, env, bp_grads, paths)
        couplers = tuple(_coupler_fidelity(m, v, tuple(inputs), target, chain, boundary_grads[v.span[1]], env,
                                           probes, seed) for v in m.tree.internal_nodes)
    where = f"tree estimate, K={m.config.corrections} {m.config.correction}" if tree_inputs else "exact chain"
    return GradientReport(blocks, couplers, objective, where, paths, loss, probes)


# -- the pieces ----------------------------------------------------------------------------------
def _check(m: Diagnosable, inputs: Sequence[torch.Tensor], paths: str, probes: int) -> None:
    if m.task_loss is None:
        raise TrainingError("no task loss was given, so there is no gradient to measure", node="loss",
                            remedy="compile with hbll_compile(..., loss=torch.nn.functional.cross_entropy)")
    if paths not in PATHS:
        raise TrainingError(f"paths must be one of {PATHS}, got {paths!r}", node="paths",
                            remedy="use paths='couplers' (what training uses) or paths='exact' (the self-check)")
    if probes < 1:
        raise TrainingError(f"probes must be >= 1, got {probes}", node="probes",
                            remedy="use a few random probes, e.g. probes=4")
    if len(inputs) != len(m.input_names):
        raise TrainingError(f"expected {len(m.input_names)} inputs ({', '.join(m.input_names)}), got {len(inputs)}",
                            node="inputs",
                            remedy="pass every model input: m.gradient_report(*inputs, target=y)")


@contextmanager
def _untouched(m: Diagnosable, seed: int) -> Iterator[None]:
    """Run with gradients on, then put back every buffer (BatchNorm statistics move when blocks run in
    train mode) and the RNG state. Blocks and the tail reseed the RNG before they run, so a random
    layer draws the same numbers in the BP pass, in each local pass and in each exact span."""
    owned = {id(b): b for b in itertools.chain(m.buffers(), m.to_original().buffers())}
    saved = [(b, b.detach().clone()) for b in owned.values()]
    units = [*m.blocks, m.tail]
    devices = sorted({t.device.index or 0 for t in itertools.chain(m.parameters(), owned.values()) if t.is_cuda})
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        hooks = [unit.register_forward_pre_hook(_reseed(seed * 7919 + j, devices)) for j, unit in enumerate(units)]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()
            with torch.no_grad():
                for buffer, value in saved:
                    buffer.copy_(value)


def _reseed(value: int, devices: list[int]) -> Callable[[nn.Module, Any], None]:
    """A pre-hook seeding the CPU generator and those of ``devices`` (the ones ``fork_rng`` restores)."""

    def hook(_module: nn.Module, _args: Any) -> None:
        torch.random.default_generator.manual_seed(value)
        for index in devices:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(value)

    return hook


def _exact_chain(
    m: Diagnosable, inputs: tuple[torch.Tensor, ...], target: torch.Tensor, env: Env
) -> tuple[list[torch.Tensor], list[torch.Tensor | None], list[torch.Tensor | None], float]:
    """``h_0 .. h_N`` of the exact chain (detached), each block's flattened BP gradient of
    ``ℓ(model(x), y)`` (``None`` for a block without trainable parameters), the BP gradient
    ``∂ℓ/∂h_i`` at each boundary (``None`` where h_i does not depend on parameters), and the loss.
    The chain is what ``m(*inputs)`` computes, run block by block to keep the boundaries."""
    h, chain = inputs[0], [inputs[0]]
    for i in range(1, m.tree.n_blocks + 1):
        h = m.run_block(i, h, env)
        chain.append(h)
    loss = m.score(h, target)
    _require_finite(loss, "loss", "the task loss of the exact chain")
    params = list(dict.fromkeys(p for p in m.blocks.parameters() if p.requires_grad))
    boundaries = [i for i, h in enumerate(chain) if i > 0 and h.requires_grad]
    wrt = [*params, *(chain[i] for i in boundaries)]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True) if wrt else ()
    by_param: dict[torch.Tensor, torch.Tensor | None] = dict(zip(params, grads))
    per_block = [_flat([(p, by_param[p]) for p in _trainable(block)]) for block in m.blocks]
    at_boundary: list[torch.Tensor | None] = [None] * len(chain)
    for i, g in zip(boundaries, grads[len(params):]):
        at_boundary[i] = g
    return [t.detach() for t in chain], per_block, at_boundary, float(loss.detach())


def _tree_estimate(m: Diagnosable, x: torch.Tensor, env: Env, paths: str) -> list[torch.Tensor]:
    """``ĥ_0 .. ĥ_{N-1}`` after the estimate and K correction sweeps the executor runs in tree mode
    (DESIGN §2; the schedule's ``_estimate_sweep`` / ``_jacobi_sweep`` order)."""
    tree, config = m.tree, m.config
    split_children = [tree.nodes[u.children[0]] for level in tree.levels()[: tree.depth] for u in level
                      if not u.is_leaf]  # top-down: each sets its right end from its left end

    def node(child: TreeNode, h: torch.Tensor) -> torch.Tensor:
        if child.is_leaf or paths == "exact":
            return _span(m, child.span, h, env)
        return m.run_coupler(child.id, h, env)

    with torch.no_grad():
        est = {0: x}
        for child in split_children:
            est[child.span[1]] = node(child, est[child.span[0]])
        for _ in range(config.corrections):
            old, est = est, {0: x}
            if config.correction == "jacobi":
                est.update((i, m.run_block_frozen(i, old[i - 1], env)) for i in range(1, tree.n_blocks))
                continue
            for child in split_children:
                a, b = child.span
                if child.is_leaf:
                    est[b] = node(child, est[a])
                else:  # Parareal: C(new_a) + f_b(old_{b-1}) - C(old_a)
                    est[b] = node(child, est[a]) + m.run_block_frozen(b, old[b - 1], env) - node(child, old[a])
    return [est[i] for i in range(tree.n_blocks)]


def _local_gradients(
    m: Diagnosable, i: int, h: torch.Tensor, target: torch.Tensor, env: Env, paths: str
) -> tuple[tuple[tuple[int, int], ...], dict[torch.Tensor, torch.Tensor]]:
    """Block i's local loss as the executor forms it, differentiated with respect to block i's
    trainable parameters only; returns the path it went through and the gradient per parameter."""
    task = _update_task(m, i)
    nodes: list[TreeNode] = []
    if task.kind is TaskKind.BLOCK_UPDATE:
        nodes = m.tree.leaves[i:] if paths == "exact" else [m.tree.nodes[v] for v in task.path]
        task = dataclasses.replace(task, path=tuple(node.id for node in nodes))
    loss = update_loss(m, task, h.detach(), target, env)[0].total
    params = _trainable(m.blocks[i - 1])
    grads = torch.autograd.grad(loss, params, allow_unused=True) if params else ()
    return tuple(node.span for node in nodes), {p: g for p, g in zip(params, grads) if g is not None}


def _update_task(m: Diagnosable, i: int) -> Task:
    """The schedule's update of block i (a DGL head update for i < N under ``"dgl"``); under ``"bp"``,
    which has none, a plain block update."""
    for task in m.schedule.tasks():
        if task.kind in (TaskKind.BLOCK_UPDATE, TaskKind.HEAD_UPDATE) and task.unit.id == i:
            return task
    return Task(TaskKind.BLOCK_UPDATE, Unit.block(i), (), ())


def _block_fidelities(
    m: Diagnosable, starts: Sequence[torch.Tensor], target: torch.Tensor, env: Env,
    bp: list[torch.Tensor | None], paths: str,
) -> tuple[BlockFidelity, ...]:
    """Every block's local gradient against its BP gradient. A parameter tied across blocks (a shared
    embedding and unembedding) collects the sum of every local loss that reaches it, as its ``.grad``
    does after a training step, so it is compared with its whole BP gradient."""
    paths_of: list[tuple[tuple[int, int], ...]] = []
    summed: dict[torch.Tensor, torch.Tensor] = {}
    for i in range(1, m.tree.n_blocks + 1):
        path, grads = _local_gradients(m, i, starts[i - 1], target, env, paths)
        paths_of.append(path)
        for p, g in grads.items():
            summed[p] = summed[p] + g if p in summed else g
    rows = []
    for i, (path, bp_i) in enumerate(zip(paths_of, bp), 1):
        local = _flat([(p, summed.get(p)) for p in _trainable(m.blocks[i - 1])])
        if local is None or bp_i is None:
            rows.append(BlockFidelity(i, None, None, 0.0, 0.0, path))
            continue
        _require_finite(local, f"block {i}", f"block {i}'s local gradient")
        local_norm, bp_norm = float(local.norm()), float(bp_i.norm())
        ratio = local_norm / bp_norm if bp_norm > 0 else None
        rows.append(BlockFidelity(i, _cosine(local, bp_i), ratio, local_norm, bp_norm, path))
    return tuple(rows)


def _coupler_fidelity(
    m: Diagnosable, v: TreeNode, inputs: tuple[torch.Tensor, ...], target: torch.Tensor, chain: list[torch.Tensor],
    bp_grad: torch.Tensor | None, env: Env, probes: int, seed: int,
) -> CouplerFidelity:
    a, b = v.span
    with torch.no_grad():
        predicted = m.run_coupler(v.id, chain[a], env)
    exact = chain[b]
    _require_finite(predicted, f"coupler {v.id}", f"the output of coupler {v.id}")
    scale = float(exact.double().pow(2).sum())
    error = float((predicted.double() - exact.double()).pow(2).sum()) / scale if scale > 0 else None

    plan = m.coupler_plan(v.id)
    source = chain[plan.source].detach().requires_grad_()
    if plan.source == 0:  # blocks may read the input through context values too (x.flatten(1), masks)
        env = m.environment(source, *inputs[1:], target=target)
    if plan.source == a:
        coupled = m.run_coupler(v.id, source, env)
    else:  # both maps start with the blocks the coupler runs exactly, so compare them from h_source
        coupled = m.run_coupling(v.id, source, env)
        coupled = m.run_tail(coupled, env) if plan.runs_tail else coupled
    spanned = _span(m, (plan.source, b), source, env)

    def vjp_cosine(u: torch.Tensor) -> float | None:
        (j_c,) = torch.autograd.grad(coupled, source, u, retain_graph=True, allow_unused=True)
        (j_s,) = torch.autograd.grad(spanned, source, u, retain_graph=True, allow_unused=True)
        return _cosine(j_c, j_s) if j_c is not None and j_s is not None else None

    generator = torch.Generator().manual_seed(seed * 100_003 + v.id)
    probed = [vjp_cosine(torch.randn(exact.shape, generator=generator, dtype=exact.dtype).to(exact.device))
              for _ in range(probes)]
    defined = [c for c in probed if c is not None]
    along_gradient = vjp_cosine(bp_grad) if bp_grad is not None else None
    return CouplerFidelity(v.id, v.span, error, sum(defined) / len(defined) if defined else None, along_gradient)


# -- small helpers -------------------------------------------------------------------------------
def _span(m: Diagnosable, span: tuple[int, int], h: torch.Tensor, env: Env) -> torch.Tensor:
    """The exact frozen chain of blocks ``span[0]+1 .. span[1]``."""
    for i in range(span[0] + 1, span[1] + 1):
        h = m.run_block_frozen(i, h, env)
    return h


def _trainable(module: nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.requires_grad]


def _flat(pairs: list[tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor | None:
    """Gradients flattened into one float64 vector (zeros where a parameter got none)."""
    if not pairs:
        return None
    return torch.cat([(g if g is not None else torch.zeros_like(p)).detach().double().flatten() for p, g in pairs])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Cosine of two tensors in float64; ``None`` when either is zero."""
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    norms = float(a.norm()) * float(b.norm())
    return float(a @ b) / norms if norms > 0 else None


def _require_finite(value: torch.Tensor, node: str, what: str) -> None:
    if not bool(torch.isfinite(value).all()):
        raise TrainingError(f"{what} is not finite", node=node,
                            remedy="check the batch and the weights (a diverged run gives NaN); "
                                   "lower the learning rate or start from a fresh model")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


# -- plots ---------------------------------------------------------------------------------------
def _figure(width: float, height: float, rows: int = 1) -> tuple[Any, Any]:
    """A matplotlib Figure without pyplot (no global backend or figure state)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("plotting needs matplotlib: pip install 'hbll-compile[plot]'") from err
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(rows, 1, squeeze=False)[:, 0]


def plot_report(report: GradientReport, path: str) -> None:
    """Bar chart of the per-block cosines of one report, saved to ``path`` (PNG or any matplotlib format)."""
    fig, (ax,) = _figure(max(5.0, 0.45 * len(report.blocks) + 2), 3.2)
    cosines = [b.cosine if b.cosine is not None else 0.0 for b in report.blocks]
    bars = ax.bar([b.block for b in report.blocks], cosines,
                  color=["#4c72b0" if c >= 0 else "#c44e52" for c in cosines])
    ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="0.5", lw=0.8, ls="--")
    ax.axhline(0.0, color="0.3", lw=0.8)
    ax.set_ylim(min(-0.05, min(cosines) - 0.05), 1.05)
    ax.set_xticks([b.block for b in report.blocks])
    ax.set_xlabel("block")
    ax.set_ylabel("cosine(local grad, BP grad)")
    ax.set_title(f"gradient fidelity ({report.objective}, {report.paths} paths): mean cosine "
                 f"{_fmt(report.mean_cosine)}", fontsize=10)
    fig.savefig(path, dpi=120)


def plot_history(history: dict[str, Any], path: str) -> None:
    """Per-block cosine (top) and per-coupler consistency error (bottom) against training step, from
    ``history["gradient_report"]`` as ``fit(..., diagnose_every=k)`` records it."""
    rows = history.get("gradient_report")
    if not rows:
        raise TrainingError("the history holds no gradient reports", node="history",
                            remedy="train with m.fit(..., diagnose_every=k)")
    fig, (top, bottom) = _figure(9.0, 6.5, rows=2)
    import matplotlib  # present: _figure checked

    steps = [r["step"] for r in rows]
    n = len(rows[0]["block_cosine"])
    colours = matplotlib.colormaps["viridis"]
    for i in range(n):
        values = [r["block_cosine"][i] if r["block_cosine"][i] is not None else math.nan for r in rows]
        top.plot(steps, values, color=colours(i / max(n - 1, 1)), lw=1.2, marker=".", label=f"block {i + 1}")
    top.plot(steps, [r["mean_cosine"] if r["mean_cosine"] is not None else math.nan for r in rows],
             color="black", lw=2.2, ls="--", label="mean")
    top.set_ylabel("cosine(local grad, BP grad)")
    top.set_title("blocks: local gradient against BP gradient", fontsize=10)
    spans = rows[0]["coupler_span"]
    tab = matplotlib.colormaps["tab20"]
    for j, (a, b) in enumerate(spans):
        errors = [r["coupler_error"][j] if r["coupler_error"][j] is not None else math.nan for r in rows]
        bottom.plot(steps, errors, lw=1.0, marker=".", color=tab(j % 20),
                    label=f"C({a},{b}]")
    bottom.set_yscale("log")
    bottom.set_xlabel("training step")
    bottom.set_ylabel("relative consistency error")
    bottom.set_title("couplers against their exact spans", fontsize=10)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=1 + max(n, len(spans)) // 12, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path, dpi=120)
