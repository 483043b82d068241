"""Linear weight prediction: a counter to the wavefront pipeline's skew.

In the wavefront (``inputs="wavefront"``) block i trains on a boundary that blocks 1..i-1 computed over
the previous i-1 steps, each with the weights it had then, while at evaluation every block runs with
today's weights. Early in training, when the optimizer moves every layer a lot per step, the later
blocks fit features that no longer exist. With exact inputs (an O(N)-deep diagnostic) a BatchNorm
ResNet at N=8 reached 96.1% against 93.6% in the wavefront (BENCHMARKS.md, issue 13).

:func:`predicted_weights` moves every block's parameters to where the optimizer is about to take them,
``steps`` updates ahead (``p + steps · u(p)``, with ``u`` the update the optimizer's moment estimates
point to), runs the enclosed training step there, and puts the parameters back exactly. A block's
outputs then enter the ring as the later blocks will see them when they read them, and its gradient,
computed at the predicted point, is applied to the real weights by the next ``optimizer.step()``: the
weight prediction of pipelined backpropagation (Kosson et al., 2021), applied to the forward skew. It adds
one elementwise pass over the blocks' parameters per step and nothing to the critical path.

Rules:
- Only the blocks' parameters move (not couplers or heads); parameters the optimizer has not stepped
  yet stay where they are.
- Supported (:func:`readable`): Adam and AdamW (their bias-corrected first moment over the root of the
  second, plus decoupled weight decay), and SGD with momentum (its momentum buffer). With any other
  optimizer the next update depends on a gradient not yet computed: ``predicted_weights`` raises
  :class:`~hbll_compile.errors.TrainingError`, and ``fit``'s default does not predict.
- ``model`` is an :class:`~hbll_compile.model.HBLLModel` or a rank's
  :class:`~hbll_compile.runtime.distributed.DistributedHBLL`: a rank moves the blocks its optimizer
  steps, and the replica refresh at the start of the step hands the moved weights to the other ranks, so
  with ``sync_every=1`` a distributed run equals the single-process one.

Example:
    >>> import torch, hbll_compile as hc
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    >>> m = hc.hbll_compile(net, (torch.randn(2, 4),), blocks=2, loss=torch.nn.functional.cross_entropy)
    >>> opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    >>> x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    >>> for _ in range(3):
    ...     opt.zero_grad()
    ...     with predicted_weights(m, opt, steps=1):
    ...         _ = m.training_step(x, target=y)
    ...     opt.step()
    >>> before = net[0].weight.clone()
    >>> with predicted_weights(m, opt, steps=1):
    ...     moved = not torch.equal(net[0].weight, before)
    >>> moved, torch.equal(net[0].weight, before)
    (True, True)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from hbll_compile.errors import TrainingError

__all__ = ["default_lead", "predicted_weights", "readable"]


def default_lead(model: Any) -> float:
    """How many optimizer steps ahead ``fit`` predicts block weights by default: N/2 under HBLL's wavefront
    over depth (a block's output is read by the blocks after it over the next 1..N-i steps), else 0 (BP,
    DGL and tree inputs have no skew; over time the chunks share one set of weights)."""
    config = model.config
    wavefront = config.objective == "hbll" and config.inputs == "wavefront" and config.over == "depth"
    return len(model.blocks) / 2 if wavefront else 0.0


def readable(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the next update of ``optimizer`` can be read from its state: Adam or AdamW without AMSGrad,
    or SGD with momentum in every parameter group."""
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        return not any(group.get("amsgrad") for group in optimizer.param_groups)
    return isinstance(optimizer, torch.optim.SGD) and all(group["momentum"] > 0 for group in optimizer.param_groups)


def _expected_update(optimizer: torch.optim.Optimizer, group: dict[str, Any], p: torch.Tensor) -> torch.Tensor | None:
    """The change the state of a :func:`readable` optimizer points to for ``p`` on its next step, before that
    step's gradient is known; None while the optimizer holds no state for ``p``."""
    state = optimizer.state.get(p)
    if not state:
        return None
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        b1, b2 = group["betas"]
        t = float(state["step"])
        direction = (state["exp_avg"] / (1 - b1**t)) / ((state["exp_avg_sq"] / (1 - b2**t)).sqrt() + group["eps"])
        if group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW)):
            direction = direction + group["weight_decay"] * p
        return -group["lr"] * direction
    return -group["lr"] * state["momentum_buffer"]


def _unreadable(optimizer: torch.optim.Optimizer) -> TrainingError:
    return TrainingError(f"weight prediction cannot read the next update of {type(optimizer).__name__}: it is not "
                         "Adam or AdamW without AMSGrad, or SGD with momentum", node="optimizer",
                         remedy="use one of those optimizers, or pass predict_weights=0")


@contextmanager
def predicted_weights(model: Any, optimizer: torch.optim.Optimizer, steps: float) -> Iterator[None]:
    """Inside the block, every block parameter ``p`` of ``model`` sits at ``p + steps · u(p)``, with ``u`` the
    update the optimizer's state points to (module docstring); on exit, even on an error, each is restored
    bit for bit. ``steps=0`` moves nothing."""
    if steps < 0:
        raise TrainingError(f"predict_weights must be >= 0, got {steps}", node="predict_weights",
                            remedy="pass a number of optimizer steps, e.g. half the block count, or 0 to turn it off")
    if steps and not readable(optimizer):
        raise _unreadable(optimizer)
    # BP, DGL and tree inputs run with steps=0 every step: they pay nothing, not even this set
    blocks = {id(p) for block in model.blocks for p in block.parameters()} if steps else set()
    saved: list[tuple[nn.Parameter, torch.Tensor]] = []
    lead = getattr(model, "predicted_lead", 0.0)
    try:
        model.predicted_lead = steps  # the model's step reads it (it warns about unpredicted steps without heads)
        with torch.no_grad():
            for group in optimizer.param_groups if steps else ():
                for p in group["params"]:
                    if id(p) not in blocks:
                        continue
                    update = _expected_update(optimizer, group, p)
                    if update is not None:
                        saved.append((p, p.detach().clone()))
                        p.add_(update, alpha=steps)
        yield
    finally:
        model.predicted_lead = lead
        with torch.no_grad():
            for p, weights in saved:
                p.copy_(weights)
