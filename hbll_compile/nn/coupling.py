"""Invertible couplers: a shape adapter followed by additive (RevNet-style) coupling layers.

Example:
    >>> c = Coupler((3, 8, 8), (16, 4, 4), hidden=8)
    >>> x = torch.randn(2, 3, 8, 8)
    >>> c(x).shape, torch.allclose(c.inverse(c(x)), x)
    (torch.Size([2, 16, 4, 4]), True)
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from .adapters import (
    Compose,
    Flatten,
    Shape,
    ShapeAdapter,
    as_shape,
    check_batch,
    compose,
    feature_axis,
    make_adapter,
)

__all__ = ["ATTENTION_DIM", "CAUSAL_KERNEL", "AdditiveCoupling", "Coupler", "LabelEmbedding", "Mixing", "check_cond"]


def _broadcast(c: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Shape a projected condition ``c`` (B, k) or, for sequences, (B, T, k) to add to ``h``, whose
    feature axis holds k: over every pixel of an image, every token of a sequence."""
    if h.dim() == 4:
        return c[:, :, None, None]
    return c.unsqueeze(1) if h.dim() == 3 and c.dim() == 2 else c


def check_cond(cond: torch.Tensor | None, x: torch.Tensor, shape: Shape, cond_dim: int, where: str) -> None:
    """Raise ValueError unless ``cond`` fits a module built with ``cond_dim`` on batches ``x`` of ``shape``.

    Rules: ``cond`` is None exactly when ``cond_dim == 0``; otherwise a floating-point tensor
    (B, cond_dim), one vector per sample, or for a sequence shape (T, D) also (B, T, cond_dim), one
    per token; a batch size of 1 is broadcast over the batch.

    Example:
        >>> check_cond(torch.zeros(2, 3), torch.zeros(2, 5), (5,), 3, "demo")
    """
    if cond is None or cond_dim == 0:
        if (cond is None) != (cond_dim == 0):
            raise ValueError(
                f"{where} was built with cond_dim={cond_dim} but got cond={'None' if cond is None else 'a tensor'}; "
                "pass a condition vector exactly when the module was built with cond_dim > 0"
            )
        return
    per_token = len(shape) == 2 and tuple(cond.shape[1:]) == (shape[0], cond_dim)
    if not (cond.dim() == 2 and cond.shape[1] == cond_dim or per_token) or cond.shape[0] not in (1, x.shape[0]):
        raise ValueError(
            f"{where} expects cond of shape (B, {cond_dim})"
            + (f" or (B, {shape[0]}, {cond_dim})" if len(shape) == 2 else "")
            + f" with B = {x.shape[0]} or 1, but got {tuple(cond.shape)}; pass one condition vector per sample"
        )
    if not cond.is_floating_point():
        raise ValueError(f"{where} expects a floating-point cond but got {cond.dtype}; embed labels first")


Mixing = Literal["none", "causal_conv", "causal_attention"]
"""Token mixing inside the F and G nets of sequence couplings (see :class:`AdditiveCoupling`)."""

CAUSAL_KERNEL = 8
"""Taps of the causal depthwise convolution of ``mixing="causal_conv"``: each one sees the current and
the 7 previous tokens, so two coupling layers (F and G each) see 29 tokens back."""

ATTENTION_DIM = 16
"""Query and key features of the attention head of ``mixing="causal_attention"``."""


class _CausalConv(nn.Module):
    """A depthwise convolution over time of a (B, T, H) batch, padded on the left only: the output at
    token t reads tokens t - CAUSAL_KERNEL + 1 .. t."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(hidden, hidden, CAUSAL_KERNEL, groups=hidden)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(h.transpose(1, 2), (CAUSAL_KERNEL - 1, 0))).transpose(1, 2)


class _CausalAttention(nn.Module):
    """One causal attention head over a (B, T, H) batch: queries and keys of ``ATTENTION_DIM`` features,
    the H features themselves as values; the output at token t reads tokens 0 .. t."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.qk = nn.Linear(hidden, 2 * ATTENTION_DIM, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        q, k = self.qk(h).chunk(2, dim=-1)
        return F.scaled_dot_product_attention(q, k, h, is_causal=True)


_MIXERS: dict[str, type[nn.Module]] = {"causal_conv": _CausalConv, "causal_attention": _CausalAttention}


class _ResidualNet(nn.Sequential):
    """The F or G net of a coupling layer; its last layer starts at zero.

    Images: Conv1x1 -> GELU -> Conv3x3 (padding 1), so the 3x3 conv gives spatial mixing
    and the 1x1 conv keeps the channel expansion cheap. Vectors and sequences:
    Linear -> GELU -> Linear over the feature axis. With ``cond_dim > 0`` a condition vector is
    projected (by ``cond``, a zero-initialised (hidden, cond_dim) matrix, so a fresh net ignores
    it) and added to the first layer's output before the GELU. With a token ``mixing`` on a
    sequence, ``mix`` (a causal depthwise convolution over time, or one causal attention head) adds
    ``mix(h)`` to the hidden layer ``h`` before the GELU; the output at token t never reads a later
    token.
    """

    def __init__(
        self, shape: Shape, in_channels: int, out_channels: int, hidden: int, cond_dim: int, mixing: Mixing
    ) -> None:
        if len(shape) == 3:
            first: nn.Module = nn.Conv2d(in_channels, hidden, 1)
            last: nn.Conv2d | nn.Linear = nn.Conv2d(hidden, out_channels, 3, padding=1)
        else:
            first, last = nn.Linear(in_channels, hidden), nn.Linear(hidden, out_channels)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)  # type: ignore[arg-type]  # both layers have a bias
        super().__init__(first, nn.GELU(), last)
        self.cond = nn.Parameter(torch.zeros(hidden, cond_dim)) if cond_dim else None
        self.mix = _MIXERS[mixing](hidden) if mixing != "none" and len(shape) == 2 else None

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        h = self[0](x)
        if self.cond is not None and cond is not None:
            h = h + _broadcast(F.linear(cond, self.cond), h)
        if self.mix is not None:
            h = h + self.mix(h)
        return self[2](self[1](h))


class AdditiveCoupling(nn.Module):
    """Exactly invertible additive coupling on per-sample ``shape`` (RevNet style).

    The feature axis (dim 1 of an image batch, the last dim otherwise) of size d is split
    into x1 (d // 2 features) and x2 (the rest)::

        y1 = x1 + gain·F(x2, c)        x2 = y2 - gain·G(y1, c)
        y2 = x2 + gain·G(y1, c)        x1 = y1 - gain·F(x2, c)

    F and G end in a zero-initialised layer, so a fresh layer is the identity. ``gain`` is a
    fixed output scale: under Adam-type optimizers, whose steps do not depend on the gradient's
    scale, the layer's function then moves ``gain`` times faster per step. With d == 1 there is
    nothing to split: the layer is ``y = x + b(c)`` with one learned scalar b (initially 0), still
    exactly invertible.

    **Conditioning.** With ``cond_dim > 0``, ``forward(x, cond)`` and ``inverse(y, cond)`` take a
    condition ``c`` (see :func:`check_cond`: one vector per sample, or per token for sequences). F
    and G add a zero-initialised linear projection of c to their hidden layer (the offset b adds one
    to its scalar), so a fresh conditioned layer equals the unconditioned one, and for every fixed c
    the layer is exactly invertible in x.

    **Token mixing.** With ``mixing="causal_conv"`` or ``"causal_attention"`` and a sequence ``shape``
    (T, D), F and G also mix tokens, with a causal depthwise convolution over time (see
    ``CAUSAL_KERNEL``) or one causal attention head (see ``ATTENTION_DIM``), so the layer can stand in
    for attention; the output at token t depends on tokens <= t only, and the layer
    stays exactly invertible (F and G may be any functions). On vectors and images (whose 3x3
    convolution already mixes space) ``mixing`` changes nothing.

    Example:
        >>> layer = AdditiveCoupling((10, 6), hidden=16)
        >>> x = torch.randn(4, 10, 6)
        >>> torch.equal(layer(x), x)
        True
        >>> conditioned = AdditiveCoupling((6,), hidden=8, cond_dim=3)
        >>> conditioned(torch.randn(4, 6), torch.randn(4, 3)).shape
        torch.Size([4, 6])
    """

    def __init__(
        self, shape: Sequence[int], hidden: int, gain: float = 1.0, cond_dim: int = 0, mixing: Mixing = "none"
    ) -> None:
        super().__init__()
        if hidden < 1 or cond_dim < 0:
            raise ValueError(f"AdditiveCoupling needs hidden >= 1 and cond_dim >= 0 but got {hidden} and {cond_dim}")
        self.shape = as_shape(shape)
        self.hidden = hidden
        self.gain = gain
        self.cond_dim = cond_dim
        self.mixing = mixing
        self.axis = feature_axis(self.shape) + 1  # feature axis of the batched tensor
        d = self.shape[self.axis - 1]
        self.split = (d // 2, d - d // 2)
        self.f: _ResidualNet | None = None
        self.g: _ResidualNet | None = None
        if d == 1:
            self.offset = nn.Parameter(torch.zeros(()))
            self.offset_cond = nn.Parameter(torch.zeros(1, cond_dim)) if cond_dim else None
        else:
            self.f = _ResidualNet(self.shape, self.split[1], self.split[0], hidden, cond_dim, mixing)
            self.g = _ResidualNet(self.shape, self.split[0], self.split[1], hidden, cond_dim, mixing)

    def _shift(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """The d == 1 layer's offset b(c)."""
        if self.offset_cond is None or cond is None:
            return self.gain * self.offset
        return self.gain * (self.offset + _broadcast(F.linear(cond, self.offset_cond), x))

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        check_batch(x, self.shape, "AdditiveCoupling")
        check_cond(cond, x, self.shape, self.cond_dim, "AdditiveCoupling")
        if self.f is None or self.g is None:
            return x + self._shift(x, cond)
        x1, x2 = x.split(self.split, dim=self.axis)
        y1 = x1 + self.gain * self.f(x2, cond)
        return torch.cat((y1, x2 + self.gain * self.g(y1, cond)), dim=self.axis)

    def inverse(self, y: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        check_batch(y, self.shape, "AdditiveCoupling.inverse")
        check_cond(cond, y, self.shape, self.cond_dim, "AdditiveCoupling.inverse")
        if self.f is None or self.g is None:
            return y - self._shift(y, cond)
        y1, y2 = y.split(self.split, dim=self.axis)
        x2 = y2 - self.gain * self.g(y1, cond)
        return torch.cat((y1 - self.gain * self.f(x2, cond), x2), dim=self.axis)

    def extra_repr(self) -> str:
        return (f"shape={self.shape}, hidden={self.hidden}, gain={self.gain:g}, cond_dim={self.cond_dim}, "
                f"mixing={self.mixing}")


class Coupler(nn.Module):
    """A cheap learned map from boundary shape ``in_shape`` to ``out_shape``.

    ``make_adapter(in_shape, out_shape)`` and ``n_layers`` ``AdditiveCoupling`` layers of width
    ``hidden`` and output ``gain``. The layers work between the adapter's leading injective parts that
    keep the tensor's rank (channel padding, space-to-depth, depth-to-space) and the rest (a crop,
    pooling, flattening): ``forward = rest ∘ layers ∘ lead``, where :attr:`space` is ``lead``'s output.
    So a coupler into narrow logits still sees every input feature, and a downsampling coupler
    (space-to-depth, then a channel crop) couples on the space-to-depth output, where each pixel phase
    is its own channel: coupling on the full-resolution input instead makes the layers' convolutions
    compute one function for all four phases (they cannot tell them apart), so the kept channels could
    hold only a quarter as many distinct features (measured in BENCHMARKS.md, issue 13). A fresh
    coupler equals its adapter. ``inverse`` undoes both parts exactly, so ``inverse(forward(x)) == x``
    whenever ``injective`` (and ``forward(inverse(y)) == y`` whenever the adapter is surjective).

    **Conditioning** (``cond_dim > 0``): ``forward(x, cond)`` and ``inverse(y, cond)`` hand a
    condition vector to every layer (see :class:`AdditiveCoupling`), so the coupler is exactly
    invertible in x for each fixed condition. ``encoder``, when given, is a submodule that maps a raw
    condition (for example integer labels, see :class:`LabelEmbedding`) to that vector:
    ``coupler(x, coupler.encode(raw))``; it trains with the coupler's other parameters.
    ``mixing`` is passed to the layers (token mixing where they work on a sequence).

    Example:
        >>> c = Coupler((64,), (64,), hidden=32)
        >>> x = torch.randn(5, 64)
        >>> torch.equal(c(x), x), c.bijective, c.flops()
        (True, True, 16384)
    """

    def __init__(
        self, in_shape: Sequence[int], out_shape: Sequence[int], hidden: int, n_layers: int = 2, gain: float = 1.0,
        cond_dim: int = 0, encoder: nn.Module | None = None, mixing: Mixing = "none",
    ) -> None:
        super().__init__()
        if n_layers < 0:
            raise ValueError(f"Coupler n_layers must be >= 0 but got {n_layers}")
        if encoder is not None and cond_dim == 0:
            raise ValueError("a Coupler with an encoder needs cond_dim > 0, the size of the encoder's vectors")
        self.adapter: ShapeAdapter = make_adapter(in_shape, out_shape)
        self.in_shape = self.adapter.in_shape
        self.out_shape = self.adapter.out_shape
        self.hidden = hidden
        self.cond_dim = cond_dim
        self.lead, self.rest = _split_adapter(self.adapter)
        self.space = self.lead.out_shape
        """The per-sample shape the coupling layers work on (and a condition must fit)."""
        self.layers = nn.ModuleList(
            AdditiveCoupling(self.space, hidden, gain, cond_dim, mixing) for _ in range(n_layers)
        )
        self.encoder = encoder

    @property
    def injective(self) -> bool:
        """True when ``inverse(forward(x)) == x`` exactly."""
        return self.adapter.injective

    @property
    def bijective(self) -> bool:
        """True when ``inverse`` is a two-sided inverse."""
        return self.adapter.bijective

    def encode(self, raw: Any) -> torch.Tensor | None:
        """The condition vector for a raw condition: ``encoder(raw)``, or ``raw`` itself without an encoder."""
        return self.encoder(raw) if self.encoder is not None else raw

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        y = self.lead(x)
        for layer in self.layers:
            y = layer(y, cond)
        return self.rest(y)

    def inverse(self, y: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        x = self.rest.inverse(y)
        for layer in reversed(self.layers):
            x = layer.inverse(x, cond)  # type: ignore[operator]  # every layer is an AdditiveCoupling
        return self.lead.inverse(x)

    def flops(self, batch: int = 1) -> int:
        """FLOPs of one forward pass on ``batch`` samples, measured by ``FlopCounterMode``.

        Counts matrix multiplies and convolutions (2 per multiply-add) on meta tensors, so
        nothing is computed. A conditioned coupler is measured on one condition vector per sample
        (an encoder's own work, a table lookup for labels, is not counted).

        Example:
            >>> Coupler((8,), (8,), hidden=4, n_layers=1).flops(batch=2)
            256
        """
        meta = {
            name: torch.empty_like(t, device="meta") for name, t in chain(self.named_parameters(), self.named_buffers())
        }
        x = torch.empty(batch, *self.in_shape, device="meta")
        cond = torch.empty(batch, self.cond_dim, device="meta") if self.cond_dim else None
        with FlopCounterMode(display=False) as counter:
            functional_call(self, meta, (x, cond))
        return int(counter.get_total_flops())

    @classmethod
    def for_budget(
        cls,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        flop_budget: int,
        n_layers: int = 2,
        min_hidden: int = 8,
        gain: float = 1.0,
        cond_dim: int = 0,
        encoder: nn.Module | None = None,
        mixing: Mixing = "none",
    ) -> Coupler:
        """The coupler with the largest ``hidden`` whose per-sample ``flops()`` is at most ``flop_budget``
        (``gain``, ``cond_dim``, ``encoder`` and ``mixing`` are passed on to the constructor).

        Candidates are measured on the meta device. The search keeps a bracket (a width
        that fits, a width that does not) and probes where the secant through the two
        measured costs meets the budget; the cost is affine in ``hidden``, so this takes
        about four measurements, and it stays correct (if slower) for any increasing
        cost. If even ``min_hidden`` exceeds the budget, or ``hidden`` does not change
        the cost (feature size 1 or ``n_layers == 0``), the coupler gets ``min_hidden``.

        Example:
            >>> Coupler.for_budget((64,), (64,), flop_budget=20_000).hidden
            39
        """
        if flop_budget < 0 or min_hidden < 1:
            raise ValueError(
                f"for_budget needs flop_budget >= 0 and min_hidden >= 1 but got {flop_budget} and {min_hidden}"
            )

        def cost(hidden: int) -> int:
            with torch.device("meta"):
                candidate = cls(in_shape, out_shape, hidden, n_layers, cond_dim=cond_dim, mixing=mixing)
            return candidate.flops()

        def secant(lo: int, c_lo: int, hi: int, c_hi: int) -> int:
            return lo + (flop_budget - c_lo) * (hi - lo) // (c_hi - c_lo)

        lo, hi = min_hidden, 2 * min_hidden
        c_lo, c_hi = cost(lo), cost(hi)
        if c_lo > flop_budget or c_hi == c_lo:
            return cls(in_shape, out_shape, min_hidden, n_layers, gain, cond_dim, encoder, mixing)
        while c_hi <= flop_budget:  # grow the bracket past the budget
            lo, c_lo, hi = hi, c_hi, max(secant(lo, c_lo, hi, c_hi) + 1, hi + 1)
            c_hi = cost(hi)
        while hi - lo > 1:
            mid = min(max(secant(lo, c_lo, hi, c_hi), lo + 1), hi - 1)
            c_mid = cost(mid)
            lo, c_lo, hi, c_hi = (mid, c_mid, hi, c_hi) if c_mid <= flop_budget else (lo, c_lo, mid, c_mid)
        return cls(in_shape, out_shape, lo, n_layers, gain, cond_dim, encoder, mixing)


def _split_adapter(adapter: ShapeAdapter) -> tuple[ShapeAdapter, ShapeAdapter]:
    """``(lead, rest)`` with ``rest ∘ lead == adapter``: ``lead`` is the whole adapter when it is injective,
    else its longest run of leading parts that are injective and keep the rank (not :class:`Flatten`, so a
    lossy image-to-vector adapter couples on the image); ``rest`` is the parts after ``lead``."""
    parts = [cast(ShapeAdapter, a) for a in adapter.parts] if isinstance(adapter, Compose) else [adapter]
    k = len(parts) if adapter.injective else 0
    while k < len(parts) and parts[k].injective and not isinstance(parts[k], Flatten):
        k += 1
    lead = compose(adapter.in_shape, parts[:k])
    return lead, compose(lead.out_shape, parts[k:])


class LabelEmbedding(nn.Module):
    """Integer class labels to learned vectors: the condition of label-conditioned couplers.

    Rules: labels 0 .. ``num_classes - 1`` have a vector each; one more learned vector stands for
    "no label". It is used for ``None`` (inference, where the label is unknown: the result is one
    (1, dim) row that broadcasts over the batch) and for negative labels (``-100``,
    ``cross_entropy``'s ``ignore_index``). In training mode every label is replaced by "no label"
    with probability ``dropout`` (drawn from the global RNG, as ``nn.Dropout`` does), so that vector
    learns to stand for an unknown label. Labels of shape (B,) give (B, dim), per-token labels (B, T)
    give (B, T, dim).

    Example:
        >>> embed = LabelEmbedding(10, 4, dropout=0.0)
        >>> embed(torch.tensor([3, 7])).shape, embed(None).shape
        (torch.Size([2, 4]), torch.Size([1, 4]))
    """

    def __init__(self, num_classes: int, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        if num_classes < 1 or dim < 1 or not 0 <= dropout < 1:
            raise ValueError(f"LabelEmbedding needs num_classes >= 1, dim >= 1 and 0 <= dropout < 1 but got "
                             f"{num_classes}, {dim} and {dropout}")
        self.num_classes = num_classes
        self.dropout = dropout
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: torch.Tensor | None) -> torch.Tensor:
        if labels is None:
            return self.table.weight[-1:]
        unknown = labels < 0
        if self.training and self.dropout:
            unknown = unknown | (torch.rand(labels.shape, device=labels.device) < self.dropout)
        return self.table(torch.where(unknown, self.num_classes, labels))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, dim={self.table.embedding_dim}, dropout={self.dropout:g}"
