"""Parameter-free shape adapters: the first stage of every coupler.

Shapes are per-sample shapes without the batch dimension: vectors ``(D,)``, token
sequences ``(T, D)`` and images ``(C, H, W)``. Adapters take a batch ``(B, *in_shape)``.
The feature (channel) axis is the first per-sample axis of an image and the last one
of a vector or a sequence; every other axis is spatial.

Each adapter has an ``inverse`` that is as exact as the map allows:

* ``injective`` adapters have an exact left inverse: ``inverse(forward(x)) == x``;
* ``surjective`` adapters have an exact right inverse: ``forward(inverse(y)) == y``;
* ``bijective`` adapters have both.

Example:
    >>> a = make_adapter((3, 8, 8), (16, 4, 4))
    >>> a.out_shape, a.injective
    ((16, 4, 4), True)
    >>> x = torch.randn(2, 3, 8, 8)
    >>> torch.equal(a.inverse(a(x)), x)
    True
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AvgPool",
    "ChannelResize",
    "Compose",
    "DepthToSpace",
    "Flatten",
    "Identity",
    "Shape",
    "ShapeAdapter",
    "SpaceToDepth",
    "Unflatten",
    "as_shape",
    "check_batch",
    "compose",
    "feature_axis",
    "make_adapter",
    "spatial_axes",
]

Shape = tuple[int, ...]


def as_shape(shape: Sequence[int]) -> Shape:
    """Validate a per-sample vector, sequence or image shape and return it as a tuple.

    Example:
        >>> as_shape(torch.Size([3, 32, 32]))
        (3, 32, 32)
    """
    out = tuple(int(s) for s in shape)
    if not 1 <= len(out) <= 3 or any(s < 1 for s in out):
        raise ValueError(
            f"shape {out} is not a per-sample vector (D,), sequence (T, D) or image (C, H, W) "
            "with positive sizes; pass the shape without the batch dimension"
        )
    return out


def feature_axis(shape: Shape) -> int:
    """Per-sample index of the feature axis: 0 for images, the last axis otherwise.

    Example:
        >>> feature_axis((3, 8, 8)), feature_axis((10, 64))
        (0, 1)
    """
    return 0 if len(shape) == 3 else len(shape) - 1


def spatial_axes(shape: Shape) -> tuple[int, ...]:
    """Per-sample indices of the spatial (non-feature) axes.

    Example:
        >>> spatial_axes((3, 8, 8)), spatial_axes((10, 64)), spatial_axes((64,))
        ((1, 2), (0,), ())
    """
    return tuple(i for i in range(len(shape)) if i != feature_axis(shape))


def check_batch(x: torch.Tensor, shape: Shape, where: str) -> None:
    """Raise ValueError unless ``x`` is a floating-point batch of per-sample ``shape``.

    Example:
        >>> check_batch(torch.zeros(2, 5), (5,), "demo")
    """
    if tuple(x.shape[1:]) != shape:
        raise ValueError(
            f"{where} expects a batch of shape (B, *{shape}) but got {tuple(x.shape)}; "
            "add the batch dimension or build the module for this shape"
        )
    if not x.is_floating_point():
        raise ValueError(
            f"{where} expects a floating-point tensor but got {x.dtype}; "
            "embed integer inputs (token ids) before this module"
        )


class ShapeAdapter(nn.Module):
    """Base class: a parameter-free map from ``in_shape`` to ``out_shape`` with a pseudo-inverse.

    Subclasses implement ``_forward`` and ``_inverse``; ``forward`` and ``inverse`` check the
    batch shape first.

    Example:
        >>> Identity((4,))(torch.ones(2, 4)).shape
        torch.Size([2, 4])
    """

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int]) -> None:
        super().__init__()
        self.in_shape = as_shape(in_shape)
        self.out_shape = as_shape(out_shape)

    @property
    def injective(self) -> bool:
        """True when ``inverse(forward(x)) == x`` exactly."""
        return True

    @property
    def surjective(self) -> bool:
        """True when ``forward(inverse(y)) == y`` exactly."""
        return True

    @property
    def bijective(self) -> bool:
        """True when ``inverse`` is a two-sided inverse."""
        return self.injective and self.surjective

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_batch(x, self.in_shape, type(self).__name__)
        return self._forward(x)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        check_batch(y, self.out_shape, f"{type(self).__name__}.inverse")
        return self._inverse(y)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{self.in_shape} -> {self.out_shape}"


class Identity(ShapeAdapter):
    """The identity map on ``shape``.

    Example:
        >>> Identity((3, 4, 4)).bijective
        True
    """

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__(shape, shape)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y


def _image_shape(shape: Sequence[int], name: str) -> Shape:
    shape = as_shape(shape)
    if len(shape) != 3:
        raise ValueError(f"{name} needs an image shape (C, H, W) but got {shape}")
    return shape


class SpaceToDepth(ShapeAdapter):
    """Fold ``factor x factor`` pixel blocks into channels: (C, H, W) -> (C*f*f, H/f, W/f). Bijective.

    Example:
        >>> SpaceToDepth((3, 8, 8), 2).out_shape
        (12, 4, 4)
    """

    def __init__(self, in_shape: Sequence[int], factor: int) -> None:
        c, h, w = _image_shape(in_shape, "SpaceToDepth")
        if factor < 1 or h % factor or w % factor:
            raise ValueError(
                f"SpaceToDepth factor {factor} must be >= 1 and divide H and W of {(c, h, w)}; "
                "pick a common divisor of H and W"
            )
        super().__init__((c, h, w), (c * factor * factor, h // factor, w // factor))
        self.factor = factor

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(x, self.factor)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(y, self.factor)


class DepthToSpace(ShapeAdapter):
    """Unfold channels into ``factor x factor`` pixel blocks: (C*f*f, H, W) -> (C, H*f, W*f). Bijective.

    Example:
        >>> DepthToSpace((12, 4, 4), 2).out_shape
        (3, 8, 8)
    """

    def __init__(self, in_shape: Sequence[int], factor: int) -> None:
        c, h, w = _image_shape(in_shape, "DepthToSpace")
        if factor < 1 or c % (factor * factor):
            raise ValueError(
                f"DepthToSpace factor {factor} must be >= 1 with factor**2 dividing C of {(c, h, w)}; "
                "resize the channels to a multiple of factor**2 first"
            )
        super().__init__((c, h, w), (c // (factor * factor), h * factor, w * factor))
        self.factor = factor

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(x, self.factor)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(y, self.factor)


class ChannelResize(ShapeAdapter):
    """Zero-pad or crop the feature axis of ``in_shape`` to ``out_channels``.

    Padding appends zero channels and is injective: ``inverse`` crops them off again.
    Cropping keeps the first ``out_channels`` channels and is not injective: ``inverse``
    zero-pads, which is only a right inverse (``forward(inverse(y)) == y``).

    Example:
        >>> ChannelResize((3, 4, 4), 5).out_shape, ChannelResize((10, 64), 32).injective
        ((5, 4, 4), False)
    """

    def __init__(self, in_shape: Sequence[int], out_channels: int) -> None:
        in_shape = as_shape(in_shape)
        axis = feature_axis(in_shape)
        out_shape = list(in_shape)
        out_shape[axis] = out_channels
        super().__init__(in_shape, out_shape)
        self.axis = axis + 1  # feature axis of the batched tensor
        self.in_channels = in_shape[axis]
        self.out_channels = out_channels

    @property
    def injective(self) -> bool:
        return self.out_channels >= self.in_channels

    @property
    def surjective(self) -> bool:
        return self.out_channels <= self.in_channels

    def _resize(self, x: torch.Tensor, channels: int) -> torch.Tensor:
        extra = channels - x.shape[self.axis]
        if extra <= 0:
            return x.narrow(self.axis, 0, channels)
        return F.pad(x, (0, 0) * (x.dim() - 1 - self.axis) + (0, extra))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._resize(x, self.out_channels)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self._resize(y, self.in_channels)


class Flatten(ShapeAdapter):
    """Flatten a per-sample shape into a vector: e.g. (C, H, W) -> (C*H*W,). Bijective.

    Example:
        >>> Flatten((3, 4, 4)).out_shape
        (48,)
    """

    def __init__(self, in_shape: Sequence[int]) -> None:
        in_shape = as_shape(in_shape)
        super().__init__(in_shape, (math.prod(in_shape),))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y.unflatten(1, self.in_shape)


class AvgPool(ShapeAdapter):
    """Average non-overlapping windows over the spatial axes; ``kernel`` has one size per spatial axis.

    Not injective (unless every kernel size is 1). ``inverse`` repeats each value over its
    window, an exact right inverse.

    Example:
        >>> AvgPool((8, 4, 6), (4, 3)).out_shape, AvgPool((10, 64), (5,)).out_shape
        ((8, 1, 2), (2, 64))
    """

    def __init__(self, in_shape: Sequence[int], kernel: Sequence[int]) -> None:
        in_shape = as_shape(in_shape)
        axes = spatial_axes(in_shape)
        kernel = tuple(int(k) for k in kernel)
        pairs = list(zip(axes, kernel, strict=False))
        if len(kernel) != len(axes) or any(k < 1 or in_shape[a] % k for a, k in pairs):
            raise ValueError(
                f"AvgPool kernel {kernel} must give one divisor for each spatial axis {axes} of {in_shape}"
            )
        out_shape = list(in_shape)
        for a, k in pairs:
            out_shape[a] //= k
        super().__init__(in_shape, out_shape)
        self.kernel = {a + 1: k for a, k in pairs}  # batched axis -> window size

    @property
    def injective(self) -> bool:
        return all(k == 1 for k in self.kernel.values())

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        split: list[int] = [x.shape[0]]
        window_axes = []
        for axis, size in enumerate(x.shape[1:], start=1):
            k = self.kernel.get(axis)
            if k is None:
                split.append(size)
            else:
                split += [size // k, k]
                window_axes.append(len(split) - 1)
        return x.reshape(split).mean(window_axes)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        for axis, k in self.kernel.items():
            y = y.repeat_interleave(k, dim=axis)
        return y


class Compose(ShapeAdapter):
    """Apply adapters in order; each one's ``out_shape`` must equal the next one's ``in_shape``.

    ``injective`` and ``surjective`` hold when they hold for every part.

    Example:
        >>> a = Compose(SpaceToDepth((3, 8, 8), 2), ChannelResize((12, 4, 4), 16))
        >>> a.out_shape, a.bijective
        ((16, 4, 4), False)
    """

    def __init__(self, *adapters: ShapeAdapter) -> None:
        if not adapters:
            raise ValueError("Compose needs at least one adapter; use Identity(shape) for none")
        for a, b in itertools.pairwise(adapters):
            if a.out_shape != b.in_shape:
                raise ValueError(
                    f"cannot compose {type(a).__name__} with output {a.out_shape} and "
                    f"{type(b).__name__} with input {b.in_shape}; the shapes must match"
                )
        super().__init__(adapters[0].in_shape, adapters[-1].out_shape)
        self.parts = nn.ModuleList(adapters)

    @property
    def injective(self) -> bool:
        return all(a.injective for a in self.parts)

    @property
    def surjective(self) -> bool:
        return all(a.surjective for a in self.parts)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        for a in self.parts:
            x = a(x)
        return x

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        for a in reversed(self.parts):
            y = a.inverse(y)  # type: ignore[operator]  # every part is a ShapeAdapter
        return y


def _finest_pool(shape: Shape, target: int) -> tuple[int, ...]:
    """Smallest pooling kernel (finest grid) whose pooled shape has at most ``target`` elements.

    Ties go to the most even kernel. Returns the global-pool kernel when nothing fits.
    """
    axes = spatial_axes(shape)
    divisors = [[k for k in range(1, shape[a] + 1) if shape[a] % k == 0] for a in axes]
    channels = shape[feature_axis(shape)]
    fitting = [
        kernel
        for kernel in itertools.product(*divisors)
        if channels * math.prod(shape[a] // k for a, k in zip(axes, kernel, strict=True)) <= target
    ]
    if not fitting:
        return tuple(shape[a] for a in axes)
    return min(fitting, key=lambda kernel: (math.prod(kernel), max(kernel) - min(kernel), kernel))


def compose(in_shape: Sequence[int], adapters: Sequence[ShapeAdapter]) -> ShapeAdapter:
    """``adapters`` applied in order from ``in_shape``: ``Identity(in_shape)`` for none, a single adapter as
    is, else a :class:`Compose`.

    Example:
        >>> compose((3, 4, 4), []).bijective, type(compose((3, 8, 8), [SpaceToDepth((3, 8, 8), 2)])).__name__
        (True, 'SpaceToDepth')
    """
    if not adapters:
        return Identity(in_shape)
    return adapters[0] if len(adapters) == 1 else Compose(*adapters)


def _chain(*adapters: ShapeAdapter) -> ShapeAdapter:
    """Compose ``adapters``, dropping identities."""
    return compose(adapters[0].in_shape, [a for a in adapters if a.in_shape != a.out_shape])


def _to_vector(in_shape: Shape, dim: int) -> ShapeAdapter:
    pool = AvgPool(in_shape, _finest_pool(in_shape, dim))
    flat = Flatten(pool.out_shape)
    return _chain(pool, flat, ChannelResize(flat.out_shape, dim))


class Unflatten(ShapeAdapter):
    """Reshape a vector into a per-sample shape: the inverse of :class:`Flatten`. Bijective.

    Example:
        >>> Unflatten(48, (3, 4, 4)).out_shape
        (3, 4, 4)
    """

    def __init__(self, size: int, out_shape: Sequence[int]) -> None:
        out_shape = as_shape(out_shape)
        if math.prod(out_shape) != size:
            raise ValueError(f"cannot unflatten {size} features into {out_shape}")
        super().__init__((size,), out_shape)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(1, self.out_shape)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y.flatten(1)


def _through_vector(in_shape: Shape, out_shape: Shape) -> ShapeAdapter:
    """The fallback for any pair of shapes: flatten, pad or crop to the output's size, reshape."""
    flat = Flatten(in_shape)
    size = math.prod(out_shape)
    return _chain(flat, ChannelResize(flat.out_shape, size), Unflatten(size, out_shape))


def _image_to_image(in_shape: Shape, out_shape: Shape) -> ShapeAdapter:
    (_, h, w), (c2, h2, w2) = in_shape, out_shape
    if (h, w) == (h2, w2):
        return ChannelResize(in_shape, c2)
    if h % h2 == 0 and w % w2 == 0 and h // h2 == w // w2:
        s2d = SpaceToDepth(in_shape, h // h2)
        return _chain(s2d, ChannelResize(s2d.out_shape, c2))
    if h2 % h == 0 and w2 % w == 0 and h2 // h == w2 // w:
        f = h2 // h
        resize = ChannelResize(in_shape, c2 * f * f)
        return _chain(resize, DepthToSpace(resize.out_shape, f))
    return _through_vector(in_shape, out_shape)


def make_adapter(in_shape: Sequence[int], out_shape: Sequence[int]) -> ShapeAdapter:
    """Build the parameter-free adapter from ``in_shape`` to ``out_shape``.

    Rules:

    * equal shapes: ``Identity``;
    * image -> image with the same H, W: ``ChannelResize``;
    * image -> image downsampled by an integer factor f (the same for H and W):
      ``SpaceToDepth(f)`` then ``ChannelResize`` (injective iff C*f*f <= C');
    * image -> image upsampled by f: ``ChannelResize`` to C'*f*f then ``DepthToSpace(f)``
      (injective iff C <= C'*f*f);
    * sequence (T, D) -> (T, D') and vector (D,) -> (D',): ``ChannelResize``;
    * image or sequence -> vector (D,): average-pool the spatial axes to the finest grid
      whose flattened size fits in D (global pooling if none fits), ``Flatten``, then
      ``ChannelResize`` to D. When the whole input fits in D nothing is pooled and the
      adapter is injective; otherwise it is not;
    * any other pair (an image into tokens, images whose resolutions do not scale by one
      integer factor): ``Flatten``, ``ChannelResize`` to the output's size, ``Unflatten``
      (injective iff the input is not larger than the output).

    Example:
        >>> make_adapter((64, 8, 8), (10,)).out_shape
        (10,)
        >>> make_adapter((3, 4, 4), (64,)).injective
        True
        >>> make_adapter((3, 16, 16), (16, 24)).out_shape
        (16, 24)
    """
    src, dst = as_shape(in_shape), as_shape(out_shape)
    if src == dst:
        return Identity(src)
    if len(src) == 3 and len(dst) == 3:
        return _image_to_image(src, dst)
    if (len(src) == len(dst) == 2 and src[0] == dst[0]) or len(src) == len(dst) == 1:
        return ChannelResize(src, dst[-1])
    if len(dst) == 1:
        return _to_vector(src, dst[0])
    return _through_vector(src, dst)
