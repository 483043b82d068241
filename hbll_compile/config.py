"""HBLLConfig: every knob of hbll-compile in one dataclass.

Example:
    >>> cfg = HBLLConfig(objective="dgl", local_head_weight=1.0)
    >>> cfg.inputs, cfg.corrections
    ('wavefront', 2)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, get_args

__all__ = ["DEFAULT_HEAD_WEIGHT", "HBLLConfig"]

Objective = Literal["hbll", "dgl", "bp", "tbptt"]
Over = Literal["depth", "time"]
Inputs = Literal["tree", "wavefront"]
Correction = Literal["parareal", "jacobi"]
ExecutorKind = Literal["loop", "batched"]
OutputTail = Literal["auto", "head", "block"]
CouplerCondition = Literal["none", "label"]
CouplerMixing = Literal["none", "causal_conv", "causal_attention"]
CouplerBudget = Literal["span", "block"]

DEFAULT_HEAD_WEIGHT = 0.5
"""λ when ``HBLLConfig.local_head_weight`` is None, for steps without weight prediction (chosen by
measurement: BENCHMARKS.md, issue 12)."""

_CHOICES = {
    "objective": get_args(Objective),
    "over": get_args(Over),
    "inputs": get_args(Inputs),
    "correction": get_args(Correction),
    "executor": get_args(ExecutorKind),
    "output_tail": get_args(OutputTail),
    "coupler_condition": get_args(CouplerCondition),
    "coupler_mixing": get_args(CouplerMixing),
    "coupler_budget": get_args(CouplerBudget),
}
"""Every choice field and its allowed values, read from the Literal types (one place)."""


@dataclass(frozen=True)
class HBLLConfig:
    """Compile and training options.

    Attributes:
        objective: ``"hbll"`` (local losses through the coupler tree), ``"dgl"`` (local heads on a
            sequential forward), ``"bp"`` (end-to-end backprop, the baseline; full BPTT over time) or,
            with ``over="time"`` only, ``"tbptt"`` (truncated BPTT with the same chunks: a detached
            forward chain, each chunk trained only by its own outputs, so with a last-step readout
            only the last chunk learns).
        over: what the blocks split: ``"depth"`` (layers, the default) or ``"time"`` (chunks of
            consecutive time steps of a recurrent model, DESIGN §4; see
            :mod:`~hbll_compile.passes.unroll`). Chunks share the model's weights, and their local
            gradients add up in them.
        inputs: how blocks get their inputs under ``"hbll"``: ``"wavefront"`` (each block reads the
            output block i-1 produced one step earlier) or ``"tree"`` (coupler estimates with
            ``corrections`` Parareal sweeps). See DESIGN §2.
        corrections: K, the number of correction sweeps in tree mode.
        correction: ``"parareal"`` or ``"jacobi"`` correction sweeps.
        coupler_cost: each coupler's FLOP budget, as a fraction of the FLOPs of the blocks it stands in
            for. Raising it buys better shallow subnetworks for more work per step (default chosen by
            measurement: BENCHMARKS.md, "Departures").
        coupler_budget: what ``coupler_cost`` is a fraction of. ``"block"`` (default): the mean FLOPs per
            block of the blocks a coupler stands in for (the span's FLOPs over its block count), so every
            coupler costs about ``coupler_cost`` of one block, a path at most log2 N of them, and a step's
            work grows as N·log2 N: a residual MLP at N=64 steps at 1.53× BP's FLOPs. ``"span"``: the FLOPs
            of all of them, so block i's path costs ``coupler_cost`` times blocks i+1..N and the work grows
            with N² blocks' worth (2.63× at N=64). Accuracy is the same within seed noise on every family
            of the benchmark table (BENCHMARKS.md, issue 13, and departure 16).
        coupler_copies: k, how many of the blocks a coupler spans it runs exactly before its learned
            part, as frozen copies: the first k of blocks a+1..b of span (a, b], at most all but the last
            (the lever of AugLocal and SOLO: stand-ins built from the real downstream layers). The copies
            are the live blocks with detached parameters, so they are refreshed every step (in
            :func:`~hbll_compile.runtime.distributed.distribute`, replicas refreshed every ``sync_every``
            steps). The learned part stays exactly invertible and stands in for the rest of the span, on
            the same per-block budget. Each copy costs one block's forward and input gradient in every
            path through the coupler, about k·N·log2(N)/2 block evaluations a step. ``0`` (default): none
            (measurements: BENCHMARKS.md, issue 13).
        coupler_layers: additive coupling layers per coupler.
        coupler_gain: output scale of the couplers' residual nets (see
            :class:`~hbll_compile.nn.coupling.AdditiveCoupling`). The optimizer is shared with the
            blocks; under Adam-type optimizers a gain g makes couplers learn g times faster, so they
            keep up with the blocks they stand for (default chosen by measurement: BENCHMARKS.md).
        output_tail: what a coupler whose span ends at the model output runs exactly after its
            learned part. ``"auto"`` (default): the model's head from the head cut on (see
            :mod:`~hbll_compile.passes.graph`): usually the final linear layer together with any
            normalisation it reads (a final LayerNorm, BatchNorm or hand-written RMSNorm, and the
            ReLU or pooling after it), which couplers cannot stand in for. The rule is the same for
            sequences (T, D): couplers ending at the output then stand in for block N's attention or
            token mixing too (see ``coupler_mixing``). ``"head"``: block N from its last legal cut on,
            even after a normalisation. ``"block"``: all of block N, which every block's path then
            runs, so one step costs up to N-1 more evaluations of block N (an 8-layer MLP-Mixer at
            N=16: 2.75× BP's FLOPs, against 1.84× with ``"auto"``). Measurements behind the rule:
            BENCHMARKS.md (issues 12 and 13).
        coupler_condition: what couplers see besides their input boundary. ``"none"`` (default).
            ``"label"``: the target, for classification (integer class labels per sample, or per token
            for sequence outputs such as a language model's next tokens): each coupler embeds it
            (:class:`~hbll_compile.nn.coupling.LabelEmbedding`) and adds the embedding inside its
            coupling layers, the lever of label-conditioned synthetic gradients (cDNI). A coupler
            stays exactly invertible in its input for each fixed label, and a fresh one equals an
            unconditioned one. Where no label is known (``m(x, depth=d)``, ``depth_report``, ONNX
            export) couplers use their learned "no label" vector, trained by ``label_dropout``.
            Refused (``LoweringError`` at compile time, ``TrainingError`` at the first step) for
            outputs that are not logits or targets that are not class labels.
        label_dropout: under ``coupler_condition="label"``, the probability that a coupler sees "no
            label" instead of a sample's label in training mode, so that depth-d subnetworks work
            without labels.
        coupler_mixing: token mixing inside couplers that work on sequences (T, D); couplers on
            vectors and images ignore it. ``"causal_conv"`` (default): F and G add a causal depthwise
            convolution over time (see :data:`~hbll_compile.nn.coupling.CAUSAL_KERNEL`), so couplers
            stand in for the token mixing of the blocks they span, block N's included (see
            ``output_tail``). ``"causal_attention"``: one small causal attention head (see
            :data:`~hbll_compile.nn.coupling.ATTENTION_DIM`), which costs more than the coupler budget
            at small widths (an MLP-Mixer at N=16: 2.22× BP's FLOPs). ``"none"``: per-token maps. Either
            mixer is causal: no output token reads a later input token. Measurements: BENCHMARKS.md
            (issue 13).
        local_head_weight: weight λ of the local-head losses added to each block's path loss under
            ``"hbll"``. ``0`` (default): no local heads. ``None``: :data:`DEFAULT_HEAD_WEIGHT` at every
            boundary where a local head can be built (:func:`~hbll_compile.nn.heads.make_head`), and no
            head elsewhere; an explicit weight > 0 needs a head at every inner boundary. Heads kept
            networks without a normalisation inside their blocks from diverging when steps ran without
            weight prediction (issue 12); with it (``fit``'s default,
            :func:`~hbll_compile.runtime.prediction.predicted_weights`) they cost accuracy on every
            family of the benchmark table, so the default has none, and a step that runs without
            prediction and without heads warns (measurements: BENCHMARKS.md, issue 13 part 6).
            ``head_weight`` is the weight in force.
        consistency_weight: weight of each coupler's consistency term ``‖C_v(h_a) − sg(h_b)‖²``.
        coupler_path_weight: weight of the task loss through a coupler's own path. DESIGN §2 adds it
            with weight 1; the default is 0, because the term made couplers better classifiers but
            worse models of the blocks they stand for (BENCHMARKS.md, "Departures").
        seed: seeds the initialisation of couplers and heads, so compiling twice gives the same model.
        executor: ``"loop"`` runs the tasks of a stage one after another; ``"batched"`` runs the block
            updates of structurally identical blocks in one stage as one ``torch.func.vmap`` over
            stacked parameters, which then hold the blocks' weights (the model's parameters become
            views of them). Blocks with buffers (BatchNorm) or tied weights, and steps whose inputs
            differ in shape, run in the loop. See :mod:`hbll_compile.runtime._batching`.
    """

    objective: Objective = "hbll"
    over: Over = "depth"
    inputs: Inputs = "wavefront"
    corrections: int = 2
    correction: Correction = "parareal"
    coupler_cost: float = 0.05
    coupler_budget: CouplerBudget = "block"
    coupler_copies: int = 0
    coupler_layers: int = 2
    coupler_gain: float = 4.0
    output_tail: OutputTail = "auto"
    coupler_condition: CouplerCondition = "none"
    label_dropout: float = 0.1
    coupler_mixing: CouplerMixing = "causal_conv"
    local_head_weight: float | None = 0.0
    consistency_weight: float = 1.0
    coupler_path_weight: float = 0.0
    seed: int = 0
    executor: ExecutorKind = "loop"

    def __post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"HBLLConfig.{name} must be one of {allowed}, got {value!r}")
        if self.corrections < 0:
            raise ValueError(f"HBLLConfig.corrections must be >= 0, got {self.corrections}")
        if self.coupler_copies < 0:
            raise ValueError(f"HBLLConfig.coupler_copies must be >= 0, got {self.coupler_copies}")
        if self.coupler_cost <= 0:
            raise ValueError(f"HBLLConfig.coupler_cost must be > 0, got {self.coupler_cost}")
        if not 0 <= self.label_dropout < 1:
            raise ValueError(f"HBLLConfig.label_dropout must be in [0, 1), got {self.label_dropout}")
        if self.coupler_gain <= 0:
            raise ValueError(f"HBLLConfig.coupler_gain must be > 0, got {self.coupler_gain}")
        if self.local_head_weight is not None and self.local_head_weight < 0:
            raise ValueError(f"HBLLConfig.local_head_weight must be None or >= 0, got {self.local_head_weight}")

    @property
    def head_weight(self) -> float:
        """The local-head weight λ in force (``local_head_weight``, or its default)."""
        return DEFAULT_HEAD_WEIGHT if self.local_head_weight is None else self.local_head_weight

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> HBLLConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})
