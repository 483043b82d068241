"""The networks of the benchmark tables that are not examples: plain modules, importable by every script.

- ``MnistCNN``: six conv-BN-ReLU layers, two poolings, a linear head (the CNN rows of BENCHMARKS.md).
- ``ResMLPLN``: issue 12's residual MLP without inner norms and a LayerNorm before the head.
- ``mnist_resnet``: a ResNet with BatchNorm and residual basic blocks for 28x28 digits.
- ``MLPMixer``: an MLP-Mixer over 7x7 patches of 28x28 digits.

Rules: each network's legal cuts fall between its residual units (a skip connection keeps two tensors
alive inside one), so the most blocks it can be cut into is the number of its parameterised units:
``mnist_resnet()`` 8 (stem, 6 basic blocks, head), ``MLPMixer`` 2 + 2 per layer (patch embedding, a
token and a channel sublayer per layer, the norm-pool-head tail).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from cifar10_resnet import ResNet  # noqa: E402  (one definition of the ResNet, shared with the example)

__all__ = ["MLPMixer", "MixerLayer", "MnistCNN", "PreHeadNormBlock", "ResMLPLN", "mnist_resnet"]


class MnistCNN(nn.Module):
    """A plain CNN with BatchNorm for 28x28 digits: six conv-BN-ReLU layers, two poolings, a linear head."""

    def __init__(self, channels: tuple[int, ...] = (8, 8, 16, 16, 32, 32), classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
            if i in (1, 3):
                layers.append(nn.MaxPool2d(2))
            c_in = c
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


class PreHeadNormBlock(nn.Module):
    """``x + fc2(gelu(fc1(x)))`` with a 2x hidden layer and no inner normalisation."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(x)))


class ResMLPLN(nn.Module):
    """Issue 12's network: a stem, residual blocks without inner norms, then a LayerNorm before the linear
    head (so the last legal cut falls between the LayerNorm and the head)."""

    def __init__(self, width: int = 256, depth: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Linear(784, width)
        self.blocks = nn.Sequential(*[PreHeadNormBlock(width) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.stem(x.flatten(1)))))


def mnist_resnet(width: int = 16, per_stage: int = 2) -> nn.Module:
    """The ResNet of ``examples/cifar10_resnet.py`` for 1x28x28 digits: a conv-BN-ReLU stem, three stages of
    ``per_stage`` basic blocks at ``width``, 2x, 4x channels (the last two downsample 28 -> 14 -> 7), global
    average pooling and a linear head."""
    return ResNet(width=width, per_stage=per_stage, in_channels=1)


class MixerLayer(nn.Module):
    """One Mixer layer: a pre-norm token-mixing MLP across patches, then a pre-norm channel MLP."""

    def __init__(self, tokens: int, width: int, token_hidden: int, channel_hidden: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.token_mlp = nn.Sequential(nn.Linear(tokens, token_hidden), nn.GELU(), nn.Linear(token_hidden, tokens))
        self.channel_mlp = nn.Sequential(nn.Linear(width, channel_hidden), nn.GELU(), nn.Linear(channel_hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class MLPMixer(nn.Module):
    """MLP-Mixer for 1x28x28 digits: non-overlapping ``patch`` x ``patch`` patches (16 tokens at 7x7)
    embedded to ``width`` by a strided conv, ``depth`` Mixer layers, a LayerNorm, mean over tokens and a
    linear head."""

    def __init__(self, width: int = 64, depth: int = 8, patch: int = 7, token_hidden: int = 64,
                 channel_hidden: int = 128, classes: int = 10, image: int = 28) -> None:
        super().__init__()
        tokens = (image // patch) ** 2
        self.embed = nn.Conv2d(1, width, patch, stride=patch)
        self.layers = nn.Sequential(*[MixerLayer(tokens, width, token_hidden, channel_hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.layers(tokens)).mean(dim=1))
