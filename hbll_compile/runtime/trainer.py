"""The training loop and evaluation helpers behind ``HBLLModel.fit`` and ``HBLLModel.depth_report``.

Example:
    >>> import torch, hbll_compile as hc
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    >>> m = hc.hbll_compile(net, (torch.randn(2, 4),), blocks=2, loss=torch.nn.functional.cross_entropy)
    >>> data = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    >>> history = m.fit(DataLoader(data, batch_size=16), epochs=1, progress=False)
    >>> len(history["loss"])
    1
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterable, Sequence, Sized
from typing import Any, Literal

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from hbll_compile._util import device_of
from hbll_compile.errors import NonFiniteError, TrainingError
from hbll_compile.runtime.fidelity import gradient_report
from hbll_compile.runtime.prediction import default_lead, predicted_weights, readable

__all__ = ["RECALIBRATE_BN", "evaluate", "fit", "recalibrate_batchnorm", "split_batch", "to_device"]

RECALIBRATE_BN = 16
"""``fit``'s default number of training batches that BatchNorm statistics are recomputed from after each epoch."""

Batch = Sequence[torch.Tensor]


def split_batch(batch: Batch) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """``(x1, ..., xk, y)`` -> ``((x1, ..., xk), y)``: the last element of a batch is the target."""
    if len(batch) < 2:
        raise ValueError("a batch must hold at least one input and a target: (inputs..., target)")
    *inputs, target = batch
    return tuple(inputs), target


def to_device(tensors: Sequence[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(device, non_blocking=True) for t in tensors)


class _Unpack(nn.Module):
    """Calls ``model(*inputs)`` on one tuple of inputs: ``update_bn`` hands the model one object per batch."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> Any:
        return self.model(*inputs)


def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Batch]) -> int:
    """Recompute the running statistics of every BatchNorm layer of ``model`` that tracks them, at the current
    weights: their plain average over ``batches`` (``(inputs..., target)``, on the model's device; empty ones
    are skipped), through ``torch.optim.swa_utils.update_bn``. Returns the number of layers recomputed;
    with none, ``batches`` is not read. The model's train/eval mode and the layers' momenta are left as
    they were.

    Why: running averages trail weights that move fast, so eval-mode outputs can be far from the train-mode
    ones (BENCHMARKS.md, issue 13: a BatchNorm ResNet after one epoch, 72% eval-mode against 95% with batch
    statistics under BP, 37% against 78% under HBLL, whose blocks train on a pipeline of changing inputs).

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        >>> recalibrate_batchnorm(net, [(torch.randn(8, 3) + 5, torch.zeros(8))])
        1
        >>> bool(net[1].running_mean.abs().max() > 0)
        True
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if layers:
        inputs = (split_batch(batch)[0] for batch in batches)
        # an empty batch would count in the average (num_batches_tracked) without adding statistics
        update_bn(([x] for x in inputs if len(x[0])), _Unpack(model).train(model.training))
    return len(layers)


@torch.no_grad()
def evaluate(model: Any, loader: Iterable[Batch], *, depth: int | None = None) -> dict[str, float]:
    """Mean task loss and accuracy (argmax over the last output dim) of ``model(*x, depth=depth)``."""
    was_training = model.training
    model.eval()
    device = device_of(model)
    total_loss, correct, count, batches = 0.0, 0, 0, 0
    try:
        for batch in loader:
            inputs, target = split_batch(to_device(batch, device))
            out = model(*inputs, depth=depth)
            if model.task_loss is not None:
                total_loss += float(model.task_loss(out, target))
            if out.dim() == target.dim() + 1 and not target.is_floating_point():
                correct += int((out.argmax(-1) == target).sum())
            count += target.numel()
            batches += 1
    finally:
        model.train(was_training)
    return {"loss": total_loss / max(batches, 1), "accuracy": correct / max(count, 1)}


def fit(
    model: Any,
    train_loader: Iterable[Batch],
    epochs: int,
    optimizer: torch.optim.Optimizer | None = None,
    eval_loader: Iterable[Batch] | None = None,
    *,
    progress: bool = True,
    on_nonfinite: Literal["raise", "skip"] = "raise",
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    diagnose_every: int | None = None,
    diagnose_batch: Batch | None = None,
    recalibrate_bn: int = RECALIBRATE_BN,
    predict_weights: float | None = None,
) -> dict[str, list[Any]]:
    """Train with ``model.training_step`` for ``epochs``; returns per-epoch history.

    Rules:
    - The default optimizer is AdamW(lr=1e-3) over all parameters (blocks, couplers, heads). The
      progress bar shows the loss, steps per second and the schedule's stage count.
    - ``history["loss"]`` is the mean of the epoch's step losses (each the deepest block's that ran); an
      epoch whose every batch was skipped reports NaN, never 0.
    - A non-finite loss or gradient raises :class:`~hbll_compile.errors.NonFiniteError` naming the
      unit (``on_nonfinite="raise"``), or skips that batch without an optimizer step
      (``on_nonfinite="skip"``; counted in ``history["skipped"]``).
    - ``checkpoint`` with ``checkpoint_every=k`` saves the model, the optimizer, the training
      pipeline and the RNG states every k steps (and at the end). With ``resume=True`` an existing
      checkpoint is loaded first and training continues from its step, skipping the batches the
      interrupted epoch already consumed: with a loader whose order depends only on the torch RNG,
      the resumed run is bit-identical to an uninterrupted one.
    - With ``diagnose_every=k`` the history also holds ``"gradient_report"``: the
      :meth:`~hbll_compile.runtime.fidelity.GradientReport.summary` of a gradient report, with its
      ``"step"``, before training and after every k steps, always on the same batch
      (``diagnose_batch``, ``(inputs..., target)``, else the first batch trained on). Steps per second
      leave the reports' time out.
    - With BatchNorm layers in the model, after every epoch (before its evaluation) their running
      statistics are recomputed from the epoch's last ``recalibrate_bn`` training batches at the epoch's
      final weights (:func:`recalibrate_batchnorm`); ``recalibrate_bn=0`` keeps the running averages that
      training left. The batches are the ones just trained on, so the loader is not read again.
    - Each step runs with the blocks' weights predicted ``predict_weights`` optimizer steps ahead
      (:func:`~hbll_compile.runtime.prediction.predicted_weights`, against the wavefront's skew); None
      takes :func:`~hbll_compile.runtime.prediction.default_lead` (N/2 under HBLL's wavefront over
      depth, else 0) when the optimizer's next update can be read (Adam, AdamW, SGD with momentum),
      else 0; 0 turns it off.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if on_nonfinite not in ("raise", "skip"):
        raise TrainingError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}", node="on_nonfinite",
                            remedy="pass 'raise' or 'skip'")
    if diagnose_every is not None and diagnose_every < 1:
        raise TrainingError(f"diagnose_every must be >= 1, got {diagnose_every}", node="diagnose_every",
                            remedy="pass a step interval such as diagnose_every=10, or None to skip reports")
    if recalibrate_bn < 0:
        raise TrainingError(f"recalibrate_bn must be >= 0, got {recalibrate_bn}", node="recalibrate_bn",
                            remedy="pass a number of training batches such as 16, or 0 to keep the running averages")
    if (checkpoint_every or resume) and checkpoint is None:
        raise TrainingError("checkpoint_every and resume need a checkpoint path", node="checkpoint",
                            remedy="pass checkpoint='run.safetensors'")
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=1e-3)
    if predict_weights is None:
        lead = default_lead(model) if readable(optimizer) else 0.0
    else:
        lead = predict_weights
    device = device_of(model)
    history: dict[str, list[Any]] = {"loss": [], "eval_loss": [], "eval_accuracy": [], "steps_per_s": [],
                                     "skipped": []}
    fixed = split_batch(to_device(diagnose_batch, device)) if diagnose_batch is not None else None
    if diagnose_every is not None:
        history["gradient_report"] = []

    def diagnose(step: int) -> float:
        """Record a report; returns its seconds, which steps/s leaves out."""
        assert fixed is not None
        began = time.perf_counter()
        report = gradient_report(model, fixed[0], fixed[1])
        history["gradient_report"].append({"step": step, **report.summary()})
        return time.perf_counter() - began

    total = len(train_loader) if isinstance(train_loader, Sized) else None
    done = 0
    rng_epoch = rng_now = torch.get_rng_state()
    if resume and checkpoint is not None and os.path.isfile(checkpoint):
        extra = model.load_checkpoint(checkpoint, optimizer)
        done = int(extra["fit.step"])
        rng_epoch = extra["fit.rng_epoch"]
        torch.set_rng_state(rng_epoch)  # replay this epoch's shuffle, then the RNG as it was at the save
        rng_now = extra["fit.rng_now"]
    if done and total is None:
        raise TrainingError("resuming mid-run needs a loader with a length", node="train_loader",
                            remedy="use a torch DataLoader over a map-style dataset")
    columns = (TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.4f}  {task.fields[rate]:.1f} steps/s  "
                          f"{len(model.schedule)} stages, critical path {model.schedule.critical_path()}"),
               TimeRemainingColumn())
    step = 0
    with Progress(*columns, disable=not progress, transient=False) as bar:
        for epoch in range(1, epochs + 1):
            if total is not None and step + total <= done:
                step += total  # finished before the checkpoint
                continue
            task = bar.add_task("train", total=total, epoch=epoch, loss=float("nan"), rate=0.0)
            model.train()
            losses, skipped, start, steps = [], 0, time.perf_counter(), 0
            recent: deque[Batch] = deque(maxlen=recalibrate_bn)
            if step >= done:
                rng_epoch = torch.get_rng_state()
            for batch in train_loader:
                if step < done:  # consumed before the checkpoint
                    step += 1
                    bar.update(task, advance=1)
                    if step == done:
                        torch.set_rng_state(rng_now)
                    continue
                inputs, target = split_batch(to_device(batch, device))
                if recalibrate_bn:
                    recent.append((*inputs, target))
                if diagnose_every is not None and not history["gradient_report"]:
                    fixed = fixed if fixed is not None else (inputs, target)
                    start += diagnose(step)
                optimizer.zero_grad(set_to_none=True)
                try:
                    with predicted_weights(model, optimizer, lead):
                        loss = model.training_step(*inputs, target=target)
                except NonFiniteError:
                    if on_nonfinite == "raise":
                        raise
                    skipped += 1
                else:
                    optimizer.step()
                    if torch.isfinite(loss):
                        losses.append(float(loss))
                step += 1
                steps += 1
                if diagnose_every is not None and step % diagnose_every == 0:
                    start += diagnose(step)
                if checkpoint is not None and checkpoint_every and step % checkpoint_every == 0:
                    _save(model, checkpoint, optimizer, step, rng_epoch)
                rate = steps / (time.perf_counter() - start)
                bar.update(task, advance=1, loss=losses[-1] if losses else float("nan"), rate=rate)
            history["loss"].append(sum(losses) / len(losses) if losses else float("nan"))
            history["skipped"].append(skipped)
            history["steps_per_s"].append(steps / (time.perf_counter() - start))
            recalibrate_batchnorm(model, recent)
            if eval_loader is not None:
                metrics = evaluate(model, eval_loader)
                history["eval_loss"].append(metrics["loss"])
                history["eval_accuracy"].append(metrics["accuracy"])
                if progress:
                    bar.console.print(f"epoch {epoch}: eval loss {metrics['loss']:.4f}, "
                                      f"accuracy {100 * metrics['accuracy']:.2f}%")
    if checkpoint is not None and checkpoint_every and step > done:
        _save(model, checkpoint, optimizer, step, rng_epoch)
    return history


def _save(model: Any, path: str | os.PathLike[str], optimizer: torch.optim.Optimizer, step: int,
          rng_epoch: torch.Tensor) -> None:
    extra = {"fit.step": torch.tensor(step), "fit.rng_epoch": rng_epoch, "fit.rng_now": torch.get_rng_state()}
    model.save(path, optimizer=optimizer, extra=extra)
