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

import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from hbll_compile.errors import TrainingError
from hbll_compile.runtime.fidelity import gradient_report

Batch = Sequence[torch.Tensor]


def split_batch(batch: Batch) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """``(x1, ..., xk, y)`` -> ``((x1, ..., xk), y)``: the last element of a batch is the target."""
    if len(batch) < 2:
        raise ValueError("a batch must hold at least one input and a target: (inputs..., target)")
    *inputs, target = batch
    return tuple(inputs), target


def to_device(tensors: Sequence[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(device, non_blocking=True) for t in tensors)


@torch.no_grad()
def evaluate(model: Any, loader: Iterable[Batch], *, depth: int | None = None) -> dict[str, float]:
    """Mean task loss and accuracy (argmax over the last output dim) of ``model(*x, depth=depth)``."""
    was_training = model.training
    model.eval()
    device = _device_of(model)
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
    diagnose_every: int | None = None,
    diagnose_batch: Batch | None = None,
) -> dict[str, list[Any]]:
    """Train with ``model.training_step`` for ``epochs``; returns per-epoch history.

    The default optimizer is AdamW(lr=1e-3) over all parameters (blocks, couplers, heads). The
    progress bar shows the loss, steps per second and the schedule's stage count.

    With ``diagnose_every=k`` the history also holds ``"gradient_report"``: the
    :meth:`~hbll_compile.runtime.fidelity.GradientReport.summary` of a gradient report, with its
    ``"step"``, before training and after every k steps, always on the same batch
    (``diagnose_batch``, ``(inputs..., target)``, else the first batch of the first epoch).
    """
    if diagnose_every is not None and diagnose_every < 1:
        raise TrainingError(f"diagnose_every must be >= 1, got {diagnose_every}", node="diagnose_every",
                            remedy="pass a step interval such as diagnose_every=10, or None to skip reports")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=1e-3)
    device = _device_of(model)
    history: dict[str, list[Any]] = {"loss": [], "eval_loss": [], "eval_accuracy": [], "steps_per_s": []}
    fixed = split_batch(to_device(diagnose_batch, device)) if diagnose_batch is not None else None
    if diagnose_every is not None:
        history["gradient_report"] = []

    def diagnose(step: int) -> float:
        """Record a report; returns its seconds, which steps/s leaves out."""
        began = time.perf_counter()
        report = gradient_report(model, fixed[0], fixed[1])
        history["gradient_report"].append({"step": step, **report.summary()})
        return time.perf_counter() - began

    global_step = 0
    total = len(train_loader) if hasattr(train_loader, "__len__") else None
    columns = (TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.4f}  {task.fields[rate]:.1f} steps/s  "
                          f"{len(model.schedule)} stages, critical path {model.schedule.critical_path()}"),
               TimeRemainingColumn())
    with Progress(*columns, disable=not progress, transient=False) as bar:
        for epoch in range(1, epochs + 1):
            task = bar.add_task("train", total=total, epoch=epoch, loss=float("nan"), rate=0.0)
            model.train()
            losses, start, steps = [], time.perf_counter(), 0
            for batch in train_loader:
                inputs, target = split_batch(to_device(batch, device))
                if diagnose_every is not None and global_step == 0:
                    fixed = fixed if fixed is not None else (inputs, target)
                    start += diagnose(0)
                optimizer.zero_grad(set_to_none=True)
                loss = model.training_step(*inputs, target=target)
                optimizer.step()
                steps += 1
                global_step += 1
                if diagnose_every is not None and global_step % diagnose_every == 0:
                    start += diagnose(global_step)
                if torch.isfinite(loss):
                    losses.append(float(loss))
                rate = steps / (time.perf_counter() - start)
                bar.update(task, advance=1, loss=losses[-1] if losses else float("nan"), rate=rate)
            history["loss"].append(sum(losses) / max(len(losses), 1))
            history["steps_per_s"].append(steps / (time.perf_counter() - start))
            if eval_loader is not None:
                metrics = evaluate(model, eval_loader)
                history["eval_loss"].append(metrics["loss"])
                history["eval_accuracy"].append(metrics["accuracy"])
                if progress:
                    bar.console.print(f"epoch {epoch}: eval loss {metrics['loss']:.4f}, "
                                      f"accuracy {100 * metrics['accuracy']:.2f}%")
    return history


def _device_of(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
