"""Plain nn.Module building blocks: shape adapters, invertible couplers and local heads."""

from .adapters import (
    AvgPool,
    ChannelResize,
    Compose,
    DepthToSpace,
    Flatten,
    Identity,
    ShapeAdapter,
    SpaceToDepth,
    make_adapter,
)
from .coupling import AdditiveCoupling, Coupler, LabelEmbedding
from .heads import MeanOverTime, make_head

__all__ = [
    "AdditiveCoupling",
    "AvgPool",
    "ChannelResize",
    "Compose",
    "Coupler",
    "DepthToSpace",
    "Flatten",
    "Identity",
    "LabelEmbedding",
    "MeanOverTime",
    "ShapeAdapter",
    "SpaceToDepth",
    "make_adapter",
    "make_head",
]
