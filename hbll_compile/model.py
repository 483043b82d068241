"""HBLLModel: the compiled model. It owns no copy of the user's weights; its blocks share them.

Example:
    >>> import torch, hbll_compile as hc
    >>> net = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(4)])
    >>> m = hc.hbll_compile(net, (torch.randn(2, 8),), blocks=4)
    >>> x = torch.randn(3, 8)
    >>> torch.equal(m(x), net(x)), m.to_original() is net, m.tree.depth
    (True, True, 2)
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal, cast

import torch
import torch.fx as fx
from torch import nn
from torch.utils.hooks import RemovableHandle

from hbll_compile._checkpoint import PIPELINE_PREFIX, load_into, read_settings, restore_optimizer, write
from hbll_compile._pipeline import Parts, run_passes
from hbll_compile._util import device_of, first_line, lookup
from hbll_compile.config import HBLLConfig
from hbll_compile.errors import CompileError, TrainingError
from hbll_compile.ir import BlockSpec, Boundary, CompileReport, CouplerPlan, Emission, Tail
from hbll_compile.nn.coupling import Coupler
from hbll_compile.passes.couplers import label_layout
from hbll_compile.passes.guards import ShapeGuards
from hbll_compile.passes.lower import bind_state
from hbll_compile.runtime._batching import blocks_sharing_parameters
from hbll_compile.runtime.executor import Executor, TaskHook
from hbll_compile.runtime.fidelity import GradientReport, gradient_report
from hbll_compile.runtime.objectives import decomposition
from hbll_compile.runtime.trainer import RECALIBRATE_BN, evaluate, fit, recalibrate_batchnorm, to_device

__all__ = ["HBLLModel"]

_LABEL = "__label__"
_EMITTED = "__emitted__"  # env key: {chunk i: the outputs its last run emitted}
"""The environment key of the batch's labels, under ``coupler_condition="label"``."""


class HBLLModel(nn.Module):
    """A model cut into ``blocks`` arranged in a balanced binary ``tree``.

    ``forward(*inputs)`` runs the exact chain of blocks and equals the original model.
    Parameters and buffers are the user's own objects: training the compiled model trains the
    original, which :meth:`to_original` returns.
    """

    _model: nn.Module
    tail: fx.GraphModule

    def __init__(
        self,
        model: nn.Module,
        parts: Parts,
        *,
        loss: Callable[..., torch.Tensor] | None = None,
        config: HBLLConfig | None = None,
    ) -> None:
        super().__init__()
        lowered = parts.lowered
        object.__setattr__(self, "_model", model)  # not a submodule: the blocks already expose its state
        self.context = lowered.context
        self.blocks = nn.ModuleList(lowered.blocks)
        self.constants = nn.Module()
        self._constant_names: dict[str, str] = {}
        for i, (target, tensor) in enumerate(lowered.constants.items()):
            self.constants.register_buffer(f"c{i}", tensor)
            self._constant_names[target] = f"c{i}"
        self.tree = parts.tree
        object.__setattr__(self, "tail", lowered.tail)  # not a submodule: block N already owns its state
        self.tail_info: Tail = lowered.tail_info
        self.emission: Emission | None = lowered.emission
        """Over time, for a model that outputs every step (see :class:`~hbll_compile.ir.Emission`)."""
        self.reduction: Literal["mean", "sum"] | None = None
        """With an emission, how the task loss decomposes over time steps, found on the first training
        step (:func:`~hbll_compile.runtime.objectives.decomposition`)."""
        self.specs: list[BlockSpec] = lowered.specs
        self.boundaries: list[Boundary] = lowered.boundaries
        self.input_names = lowered.input_names
        self.context_names = lowered.context_names
        self.couplers = parts.couplers
        self.coupler_plans = parts.coupler_plans
        self._plans = {p.node: p for p in parts.coupler_plans}
        self.heads = parts.heads
        self.schedule = parts.schedule
        self.task_loss = loss
        self.config = config or HBLLConfig()
        self.report: CompileReport = parts.report
        self.guards: ShapeGuards | None = parts.captured.guards
        """The capture's shape conditions, checked on every call (None for a torch.fx capture)."""
        self._labels = label_layout(self.boundaries[-1]) if self.config.coupler_condition == "label" else None
        self.predicted_lead = 0.0
        """The weight prediction's lead the current step runs under (set by ``hc.predicted_weights``)."""
        self._warned_unpredicted = False
        self._executor = Executor(parts.schedule, self)
        self._needs_isolation = _needs_isolation(self.blocks)
        self._plain_frozen = False
        self.train(model.training)

    # -- state sharing -------------------------------------------------------------------------
    def _resolve(self, target: str) -> object:
        if target in self._constant_names:
            return getattr(self.constants, self._constant_names[target])
        return lookup(self._model, target)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> HBLLModel:
        """Convert the user's model once, then re-point the blocks at its (possibly new) tensors."""
        self._model._apply(fn)
        for name, child in self.named_children():
            if name not in ("blocks", "context"):
                child._apply(fn)
        for module in (self.context, *self.blocks, self.tail):
            bind_state(module, self._resolve)
        pipeline = self._executor.pipeline_state()  # the in-flight batches follow the model
        self._executor.load_pipeline_state({k: fn(v) for k, v in pipeline.items()})
        return self

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        """Add the training pipeline (step counter, wavefront ring) as ``pipeline.*`` tensors, so that
        ordinary checkpointing (``torch.save(m.state_dict())``, :meth:`save`) resumes exactly."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, value in self._executor.pipeline_state().items():
            destination[f"{prefix}{PIPELINE_PREFIX}{key}"] = value if keep_vars else value.detach()

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any], strict: bool,
        missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:
        start = f"{prefix}{PIPELINE_PREFIX}"
        pipeline = {k.removeprefix(start): state_dict.pop(k) for k in [k for k in state_dict if k.startswith(start)]}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        device = device_of(self)
        self._executor.load_pipeline_state({k: v.to(device) for k, v in pipeline.items()})

    def train(self, mode: bool = True) -> HBLLModel:
        self._model.train(mode)
        return super().train(mode)

    def to_original(self) -> nn.Module:
        """The user's model object, holding every trained parameter and buffer."""
        return self._model

    # -- inference -----------------------------------------------------------------------------
    def environment(self, *inputs: torch.Tensor, target: torch.Tensor | None = None) -> dict[str, Any]:
        """Model inputs and context values by name: what blocks read besides their boundary; under
        ``coupler_condition="label"`` also the batch's labels, when ``target`` is given (label-conditioned
        couplers see "no label" without it).

        Raises:
            GuardError: inputs outside the capture's shape guards.
            TrainingError: under ``coupler_condition="label"``, a target that is not class labels.
        """
        if self.guards is not None:
            self.guards.check(*inputs)
        env: dict[str, Any] = dict(zip(self.input_names, inputs))
        env.update(zip(self.context_names, self.context(*inputs)))
        if target is not None and self._labels is not None:
            env[_LABEL] = _checked_labels(target, *self._labels)
        return env

    def run_block(self, i: int, h: torch.Tensor, env: dict[str, Any]) -> torch.Tensor:
        """Block i (1-based) on boundary ``h_{i-1}``; with an emission, the outputs of its steps are left
        in ``env`` for :meth:`emitted`."""
        return self._emit(i, self.blocks[i - 1](h, *(env[name] for name in self.specs[i - 1].context)), env)

    def run_block_frozen(self, i: int, h: torch.Tensor, env: dict[str, Any]) -> torch.Tensor:
        """Block i as a fixed function: no gradient reaches its parameters and, in train mode, its
        running statistics (BatchNorm) are not updated. Used inside paths and estimates."""
        out = self._run_frozen(self.blocks[i - 1], self._needs_isolation[i - 1], self.specs[i - 1], h, env)
        return self._emit(i, out, env)

    def _emit(self, i: int, out: Any, env: dict[str, Any]) -> torch.Tensor:
        if self.emission is None:
            return cast(torch.Tensor, out)
        h, emitted = out
        env.setdefault(_EMITTED, {})[i] = emitted
        return cast(torch.Tensor, h)

    def emitted(self, i: int, env: dict[str, Any]) -> torch.Tensor:
        """The outputs chunk i emitted in its latest run on ``env``'s batch (models with an emission);
        taken, so that ``env`` keeps no autograd graph alive."""
        return cast(torch.Tensor, env[_EMITTED].pop(i))

    def run_tail(self, t: torch.Tensor, env: dict[str, Any]) -> torch.Tensor:
        """The model's output tail (see :class:`~hbll_compile.ir.Tail`) as a fixed function."""
        return self._run_frozen(self.tail, self._needs_isolation[-1], self.tail_info.spec, t, env)

    def _run_frozen(
        self, module: nn.Module, isolate: bool, spec: BlockSpec, h: torch.Tensor, env: dict[str, Any]
    ) -> torch.Tensor:
        args = (h, *(env[name] for name in spec.context))
        if not isolate or self._plain_frozen:
            return module(*args)  # backward(inputs=...) already keeps its parameters out of the update
        state = {name: p.detach() for name, p in module.named_parameters()}
        state.update((name, b.clone()) for name, b in module.named_buffers())
        return torch.func.functional_call(module, state, args)

    def coupler_plan(self, node: int) -> CouplerPlan:
        """What was built for the coupler of tree node ``node`` (see :class:`~hbll_compile.ir.CouplerPlan`)."""
        return self._plans[node]

    @contextlib.contextmanager
    def exporting(self) -> Iterator[None]:
        """Eval mode, restored afterwards; inside, frozen blocks run as plain calls. In eval mode without
        gradients that computes the same values, and exporters cannot trace the
        ``torch.func.functional_call`` that isolates frozen blocks in training."""
        was_training, was_plain = self.training, self._plain_frozen
        self.eval()
        self._plain_frozen = True
        try:
            yield
        finally:
            self._plain_frozen = was_plain
            self.train(was_training)

    def score(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The task loss ``loss(output, target)``, checked: a scalar tensor.

        Raises:
            TrainingError: no loss was given, the loss rejects the target, or it returns no scalar tensor.
        """
        if self.task_loss is None:
            raise TrainingError("no task loss was given", node="loss",
                                remedy="compile with hbll_compile(..., loss=torch.nn.functional.cross_entropy)")
        try:
            loss = self.task_loss(output, target)
        except Exception as err:  # noqa: BLE001 - any failure of the user's loss on this target
            raise TrainingError(
                f"the task loss failed on an output of shape {tuple(output.shape)} and a target of shape "
                f"{tuple(target.shape)} ({target.dtype}): {type(err).__name__}: {first_line(err)}",
                node="target", remedy="pass targets the loss accepts for the model's output",
            ) from err
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            got = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise TrainingError(f"the task loss returned {got}, not a scalar tensor", node="loss",
                                remedy="reduce the loss to a scalar tensor (e.g. reduction='mean')")
        return loss

    def run_coupler(self, node: int, h: torch.Tensor, env: dict[str, Any]) -> torch.Tensor:
        """Coupler of tree node ``node`` on its span's left boundary: blocks ``span[0]+1..plan.source``
        first (block 1 for token inputs and over time, frozen copies), the output tail last for spans that
        end at the output, conditioned on the span's per-step inputs over time (see
        :mod:`hbll_compile.passes.couplers`)."""
        plan = self._plans[node]
        for i in range(plan.span[0] + 1, plan.source + 1):
            h = self.run_block_frozen(i, h, env)
        h = self.run_coupling(node, h, env)
        if plan.runs_tail:
            h = self.run_tail(h, env)
        return h

    def run_coupling(self, node: int, h: torch.Tensor, env: dict[str, Any]) -> torch.Tensor:
        """The learned part of coupler ``node`` alone, on boundary ``plan.source``. Over time it sees the
        span's per-step inputs (``plan.condition``); a label-conditioned coupler sees the labels in
        ``env`` (its "no label" vector where there are none)."""
        coupler = cast(Coupler, self.couplers[str(node)])
        condition = self._plans[node].condition
        if condition:  # over time: the span's per-step inputs, summarised by the coupler's encoder
            return coupler(h, coupler.encode(torch.cat([env[name].flatten(1) for name in condition], dim=1)))
        return coupler(h, coupler.encode(env.get(_LABEL)))

    def run_node(self, node: int, h: torch.Tensor, env: dict[str, Any]) -> torch.Tensor:
        """A tree node as a fixed map: its coupler, or its block (frozen) for a leaf."""
        tree_node = self.tree.nodes[node]
        if tree_node.is_leaf:
            return self.run_block_frozen(tree_node.span[1], h, env)
        return self.run_coupler(node, h, env)

    def forward(self, *inputs: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """The exact chain of blocks, or with ``depth=d`` the depth-d subnetwork (couplers and blocks).
        Over time (``over="time"``) a coupler in the depth-d subnetwork skips a span of time steps: it
        maps the state at the span's start to an estimate of the state at its end, reading only a linear
        summary of the span's inputs, so ``depth=0`` runs chunk 1 and one coupler. A model that outputs
        every time step returns the concatenation of its chunks' emitted outputs, and refuses ``depth``
        below the tree's (a skipped span has no outputs).

        Raises:
            CompileError: the wrong number of inputs, a non-tensor input, a depth that is not an
                integer in 0..tree depth, or inputs the blocks cannot run (a ``GuardError`` for shapes
                outside the capture's guards), naming the inputs and chaining torch's error.
        """
        self._check_inputs(inputs)
        if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int)
                                  or not 0 <= depth <= self.tree.depth):
            raise CompileError(f"depth must be None or an integer in 0..{self.tree.depth}, got {depth!r}",
                               node="depth", remedy=f"pass depth=None (the exact chain) or 0..{self.tree.depth}")
        if depth is not None and depth < self.tree.depth and self.emission is not None:
            raise CompileError("this model outputs every time step, and a coupler that skips a span of steps "
                               "computes none of their outputs", node="depth",
                               remedy="call the model without depth (the exact chain); depth=d applies to models "
                               "that read only the last step")
        try:
            return self._forward(inputs, depth)
        except CompileError:
            raise
        except Exception as err:  # noqa: BLE001 - a raw torch error deep in a block: name the inputs instead
            raise CompileError(
                f"the compiled model failed on inputs {_describe(inputs)}: {type(err).__name__}: {first_line(err)}",
                node=self.input_names[0], remedy="pass inputs of the example's dtype and shape (batch size aside)",
            ) from err

    def _forward(self, inputs: tuple[torch.Tensor, ...], depth: int | None) -> torch.Tensor:
        env = self.environment(*inputs)
        h = inputs[0]
        if depth is None or depth >= self.tree.depth:
            for i in range(1, len(self.blocks) + 1):
                h = self.run_block(i, h, env)
            if self.emission is not None:
                return torch.cat([self.emitted(i, env) for i in range(1, len(self.blocks) + 1)], self.emission.dim)
            return h
        for node in self.tree.nodes_at_depth(depth):
            h = self.run_block(node.span[1], h, env) if node.is_leaf else self.run_coupler(node.id, h, env)
        return h

    # -- training ------------------------------------------------------------------------------
    def training_step(self, *inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """One step of the configured objective: fills ``.grad`` of blocks, couplers and heads by their
        local losses only; call ``optimizer.step()`` afterwards. Returns the task loss of the deepest
        block that ran (with ``inputs="wavefront"``, on the batch that entered N-1 steps ago)."""
        if self.task_loss is None:
            raise TrainingError("no task loss was given", node="loss",
                                remedy="compile with hbll_compile(..., loss=torch.nn.functional.cross_entropy)")
        self._check_inputs(inputs)
        if not isinstance(target, torch.Tensor):
            raise TrainingError(f"target must be a tensor, got {type(target).__name__}", node="target",
                                remedy="call training_step(*inputs, target=y) with the batch's targets")
        if target.dim() and inputs[0].dim() and target.shape[0] != inputs[0].shape[0]:
            raise TrainingError(f"target has {target.shape[0]} rows but the batch has {inputs[0].shape[0]}",
                                node="target", remedy="pass the targets of this batch")
        if self.emission is not None and self.reduction is None:
            self.reduction = decomposition(self.task_loss, self.emission, inputs[0].shape[0], target)
        self._warn_if_unpredicted()
        try:
            return self._executor.step(inputs, target)
        except CompileError:
            raise
        except Exception as err:  # noqa: BLE001 - a raw torch error deep in a unit: name the batch instead
            raise TrainingError(
                f"the training step failed on inputs {_describe(inputs)} and a target {_describe((target,))}: "
                f"{type(err).__name__}: {first_line(err)}", node="inputs",
                remedy="pass inputs of the example's dtype and shape (batch size aside) and targets the loss accepts",
            ) from err

    def _warn_if_unpredicted(self) -> None:
        """Warn once when a wavefront step over depth runs without weight prediction and without local
        heads: measured, that made networks without a normalisation inside their blocks diverge."""
        config = self.config
        if self._warned_unpredicted or self.predicted_lead or len(self.heads) or config.objective != "hbll" \
                or config.inputs != "wavefront" or config.over != "depth" or len(self.blocks) < 2:
            return
        self._warned_unpredicted = True
        warnings.warn("HBLL wavefront steps without weight prediction and without local heads: on networks "
                      "without a normalisation inside their blocks the blocks' stale inputs can make training "
                      "diverge. Train with m.fit (it predicts), wrap each step in hc.predicted_weights(m, "
                      "optimizer, hc.default_lead(m)), or compile with local_head_weight=None (local heads).",
                      UserWarning, stacklevel=3)

    def _check_inputs(self, inputs: tuple[Any, ...]) -> None:
        if len(inputs) != len(self.input_names):
            raise CompileError(f"expected {len(self.input_names)} inputs ({', '.join(self.input_names)}), "
                               f"got {len(inputs)}", node="inputs", remedy="pass one tensor per model input")
        for name, x in zip(self.input_names, inputs):
            if not isinstance(x, torch.Tensor):
                raise CompileError(f"input {name} is a {type(x).__name__}, not a tensor", node=name,
                                   remedy="pass tensors shaped like the compile-time example")

    def register_task_hook(self, hook: TaskHook) -> RemovableHandle:
        """Call ``hook(task, done)`` before (``done=False``) and after (``done=True``) every task of a
        training step; returns a handle whose ``remove()`` stops it."""
        return self._executor.register_task_hook(hook)

    def reset_pipeline(self) -> None:
        """Drop the activations the wavefront pipeline carries between steps."""
        self._executor.reset()

    def fit(
        self,
        train_loader: Iterable[Sequence[torch.Tensor]],
        epochs: int,
        optimizer: torch.optim.Optimizer | None = None,
        eval_loader: Iterable[Sequence[torch.Tensor]] | None = None,
        *,
        progress: bool = True,
        on_nonfinite: Literal["raise", "skip"] = "raise",
        checkpoint: str | os.PathLike[str] | None = None,
        checkpoint_every: int = 0,
        resume: bool = False,
        diagnose_every: int | None = None,
        diagnose_batch: Sequence[torch.Tensor] | None = None,
        recalibrate_bn: int = RECALIBRATE_BN,
        predict_weights: float | None = None,
    ) -> dict[str, list[Any]]:
        """Train for ``epochs`` on batches ``(inputs..., target)`` with a rich progress bar (loss,
        steps/s, stage count); default optimizer AdamW(lr=1e-3). Returns the per-epoch history. See
        :func:`hbll_compile.runtime.trainer.fit` for non-finite handling, checkpoints, resuming,
        ``diagnose_every`` (the :meth:`gradient_report` summary every k steps on one fixed batch) and
        ``recalibrate_bn`` (BatchNorm statistics recomputed after each epoch, see
        :meth:`recalibrate_batchnorm`) and ``predict_weights`` (each step runs at the blocks' weights that
        many optimizer steps ahead, against the wavefront's skew; None: N/2 under HBLL's wavefront, see
        :mod:`hbll_compile.runtime.prediction`)."""
        return fit(self, train_loader, epochs, optimizer, eval_loader, progress=progress, on_nonfinite=on_nonfinite,
                   checkpoint=checkpoint, checkpoint_every=checkpoint_every, resume=resume,
                   diagnose_every=diagnose_every, diagnose_batch=diagnose_batch, recalibrate_bn=recalibrate_bn,
                   predict_weights=predict_weights)

    def recalibrate_batchnorm(self, batches: Iterable[Sequence[torch.Tensor]]) -> int:
        """Recompute every BatchNorm layer's running statistics from ``batches`` ``(inputs..., target)`` at the
        current weights (a plain average; :func:`hbll_compile.runtime.trainer.recalibrate_batchnorm`). Call it
        before evaluating a model trained outside :meth:`fit`. Returns the number of layers recomputed."""
        device = device_of(self)
        return recalibrate_batchnorm(self, (to_device(batch, device) for batch in batches))

    def depth_flops(self, depth: int | None) -> int:
        """Per-sample FLOPs of ``self(x, depth=depth)`` (the exact chain for ``None``)."""
        per_block = [spec.sample_flops for spec in self.specs]
        if depth is None or depth >= self.tree.depth:
            return int(sum(per_block))
        total = 0.0
        for node in self.tree.nodes_at_depth(depth):
            if node.is_leaf:
                total += per_block[node.span[1] - 1]
            else:
                plan = self._plans[node.id]
                total += plan.flops + sum(per_block[plan.span[0]:plan.source])
                total += self.tail_info.spec.sample_flops if plan.runs_tail else 0
        return int(total)

    def depth_report(self, loader: Iterable[Sequence[torch.Tensor]]) -> list[dict[str, float]]:
        """Accuracy, loss and per-sample FLOPs of every depth-d subnetwork, d = 0..tree depth
        (the last row is the exact chain)."""
        rows = []
        for d in range(self.tree.depth + 1):
            metrics = evaluate(self, loader, depth=d)
            rows.append({"depth": d, "flops": self.depth_flops(d), **metrics})
        return rows

    def gradient_report(
        self, *inputs: torch.Tensor, target: torch.Tensor, paths: str = "couplers", probes: int = 4, seed: int = 0
    ) -> GradientReport:
        """The gradient-fidelity instrument on one batch at the current weights: per block, the cosine
        and norm ratio of its local gradient against its BP gradient; per coupler, its consistency
        error and VJP alignment with its exact span. ``paths="exact"`` swaps couplers for exact spans
        (then cosines are 1: the self-check). Changes no weight, gradient, buffer, RNG or pipeline
        state. See :mod:`hbll_compile.runtime.fidelity`.

        Raises:
            TrainingError: over time, where chunks share one set of weights, so a chunk's own BP
                gradient is not defined.
        """
        if self.config.over == "time":
            raise TrainingError("the gradient-fidelity instrument compares each block's gradient with its BP "
                                "gradient, but over='time' chunks share one set of weights, so a chunk has no "
                                "gradient of its own to compare", node="gradient_report",
                                remedy="compare training runs (objective 'hbll' against 'bp' and 'tbptt') instead")
        return gradient_report(self, inputs, target, paths=paths, probes=probes, seed=seed)

    # -- persistence ---------------------------------------------------------------------------
    def save(
        self, path: str | os.PathLike[str], *, optimizer: torch.optim.Optimizer | None = None,
        extra: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Write the state dict (model, couplers, heads, training pipeline), the compile settings and a
        checksum to a safetensors file (its directory is created), plus ``optimizer``'s state and
        ``extra`` named tensors when given. :meth:`load` rebuilds the compiled model from it,
        :meth:`restore_optimizer` the optimizer; :meth:`load_checkpoint` loads it into this model."""
        settings = {"blocks": len(self.blocks), "config": self.config.to_dict(),
                    "example_inputs": self.report.example_inputs}
        write(self, path, settings, optimizer, extra)

    def load_checkpoint(
        self, path: str | os.PathLike[str], optimizer: torch.optim.Optimizer | None = None
    ) -> dict[str, torch.Tensor]:
        """Load a file written by :meth:`save` into this model (and ``optimizer``); returns its ``extra``
        tensors.

        Raises:
            CompileError: the file is corrupt or does not fit this model or optimizer.
        """
        extra = load_into(self, path)
        if optimizer is not None:
            restore_optimizer(optimizer, path)
        return extra

    @staticmethod
    def restore_optimizer(optimizer: torch.optim.Optimizer, path: str | os.PathLike[str]) -> None:
        """Load the optimizer state saved by ``save(path, optimizer=...)`` into ``optimizer``, which must be
        built the same way on the loaded model's ``parameters()``.

        Raises:
            CompileError: the file holds no optimizer state, or it does not fit ``optimizer``.
        """
        restore_optimizer(optimizer, path)

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], model_factory: Callable[[], nn.Module], *,
        loss: Callable[..., torch.Tensor] | None = None,
    ) -> HBLLModel:
        """Compile ``model_factory()`` as it was saved (block count, config, example input shapes) and
        load every saved tensor into it, strictly.

        Example:
            >>> import torch, tempfile, os, hbll_compile as hc
            >>> factory = lambda: torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
            >>> m = hc.hbll_compile(factory(), (torch.randn(2, 4),), blocks=2)
            >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors"); m.save(path)
            >>> x = torch.randn(3, 4); torch.equal(hc.HBLLModel.load(path, factory)(x), m(x))
            True
        """
        settings = read_settings(path)
        if not callable(model_factory):
            raise CompileError(f"model_factory must be callable, got {type(model_factory).__name__}",
                               node="model_factory", remedy="pass the function that builds the saved model")
        model = model_factory()
        if not isinstance(model, nn.Module):
            raise CompileError(f"model_factory returned a {type(model).__name__}, not an nn.Module",
                               node="model_factory", remedy="pass the function that builds the saved model")
        examples = tuple(torch.zeros(shape, dtype=getattr(torch, dtype)) for shape, dtype in settings["example_inputs"])
        config = HBLLConfig.from_dict(settings["config"])
        compiled = cls(model, run_passes(model, examples, blocks=settings["blocks"], config=config),
                       loss=loss, config=config)
        load_into(compiled, path)
        return compiled

    # -- inspection ----------------------------------------------------------------------------
    def describe(self) -> str:
        """A table: block, span of graph nodes, FLOPs, parameters, boundary shape, tree level."""
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"HBLL blocks: N={len(self.blocks)}, tree depth {self.tree.depth}")
        for column in ("block", "span", "FLOPs", "params", "boundary out", "tree level"):
            table.add_column(column, justify="right" if column in ("FLOPs", "params") else "left")
        level = {leaf.span[1]: leaf.depth for leaf in self.tree.leaves}
        for spec, boundary in zip(self.specs, self.boundaries[1:]):
            span = spec.nodes[0] if len(spec.nodes) == 1 else f"{spec.nodes[0]} .. {spec.nodes[-1]}"
            table.add_row(str(spec.index), span, f"{spec.flops:,}", f"{spec.param_count:,}",
                          "B×" + "×".join(map(str, boundary.shape)), str(level[spec.index]))
        console = Console(width=140, record=True, file=io.StringIO())
        console.print(table)
        return console.export_text()

    def __repr__(self) -> str:
        return f"HBLLModel(blocks={len(self.blocks)}, depth={self.tree.depth}, model={type(self._model).__name__})"


def _checked_labels(target: torch.Tensor, classes: int, shape: tuple[int, ...]) -> torch.Tensor:
    """``target`` as the labels of label-conditioned couplers: integer class ids below ``classes``, of
    per-sample ``shape`` (one per sample, or per token); negative ids mean "no label"."""
    wanted = f"(B{''.join(f', {t}' for t in shape)})"
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool \
            or tuple(target.shape[1:]) != shape:
        raise TrainingError(
            f"HBLLConfig.coupler_condition='label' needs integer class labels of shape {wanted}, "
            f"got {target.dtype} of shape {tuple(target.shape)}", node="target",
            remedy="pass class ids as targets, or compile with coupler_condition='none' for other tasks")
    if bool((target >= classes).any()):
        raise TrainingError(
            f"HBLLConfig.coupler_condition='label' got a label above {classes - 1}, the model's largest class",
            node="target", remedy=f"pass class ids in 0..{classes - 1} (negative ids mean no label)")
    return target


def _describe(tensors: tuple[torch.Tensor, ...]) -> str:
    return ", ".join(f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in tensors)


def _needs_isolation(blocks: nn.ModuleList) -> list[bool]:
    """Blocks that must run on detached copies of their state when used as a fixed map: those with
    buffers (BatchNorm statistics must not move) or with a tied parameter (a tied weight would otherwise
    collect gradient through another unit's path)."""
    tied = blocks_sharing_parameters(list(blocks))
    return [i in tied or any(True for _ in block.buffers()) for i, block in enumerate(blocks, 1)]
