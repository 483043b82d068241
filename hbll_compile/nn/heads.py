"""Local heads: small modules that map a boundary batch to the model-output shape for a local loss.

Example:
    >>> head = make_head((64, 8, 8), (10,))
    >>> head(torch.randn(2, 64, 8, 8)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .adapters import as_shape, feature_axis

__all__ = ["MeanOverTime", "make_head"]


class MeanOverTime(nn.Module):
    """Average a sequence batch ``(B, T, D)`` over time, giving ``(B, D)``.

    Example:
        >>> MeanOverTime()(torch.ones(2, 5, 3)).shape
        torch.Size([2, 3])
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


def make_head(boundary_shape: Sequence[int], output_shape: Sequence[int]) -> nn.Module:
    """Build a local head from per-sample ``boundary_shape`` to per-sample ``output_shape``.

    * image (C, H, W) -> (K,): global average pool, then Linear(C, K);
    * image (C, H, W) -> image (K, H', W'): adaptive average pool to (H', W'), then a 1x1
      conv C -> K (the two commute; pooling first is cheaper);
    * sequence (T, D) -> (T, V): Linear(D, V) over the last axis;
    * sequence (T, D) -> (K,): mean over T, then Linear(D, K);
    * vector (D,) -> (K,): Linear(D, K).

    Example:
        >>> make_head((16, 32), (16, 100))(torch.randn(2, 16, 32)).shape
        torch.Size([2, 16, 100])
    """
    src, dst = as_shape(boundary_shape), as_shape(output_shape)
    if len(dst) == 1:
        pools: dict[int, list[nn.Module]] = {3: [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)], 2: [MeanOverTime()], 1: []}
        pool = pools[len(src)]
        return nn.Sequential(*pool, nn.Linear(src[feature_axis(src)], dst[0]))
    if len(src) == len(dst) == 3:
        return nn.Sequential(nn.AdaptiveAvgPool2d(dst[1:]), nn.Conv2d(src[0], dst[0], 1))
    if len(src) == len(dst) == 2 and src[0] == dst[0]:
        return nn.Linear(src[1], dst[1])
    raise ValueError(
        f"no local head from boundary {src} to output {dst}; supported: image->(K,), "
        "image->image, (T, D)->(T, V), (T, D)->(K,) and (D,)->(K,)"
    )
