"""The one shared test helper module: the model zoo and the helpers several test modules use.

Every test that needs "a real model" takes it from ``ZOO``. Each :class:`Case` builds a fresh model
(seeded) and example inputs, and says which block counts it must compile at. ``examples/`` is on the
test path (``pythonpath`` in pyproject.toml), so the zoo reuses the examples' own modules.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from charlm_gpt import CausalSelfAttention
from cifar10_resnet import BasicBlock  # one definition of the residual block, shared with the example
from hypothesis import HealthCheck, settings
from torch import nn

import hbll_compile as hc
from hbll_compile.runtime.schedule import Task, TaskKind, Unit


class MLP(nn.Module):
    def __init__(self, d_in: int = 20, width: int = 32, depth: int = 6, classes: int = 5) -> None:
        super().__init__()
        dims = [d_in] + [width] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:]))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)


class ResidualBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class ResMLP(nn.Module):
    def __init__(self, d_in: int = 20, width: int = 32, depth: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Linear(d_in, width)
        self.blocks = nn.Sequential(*[ResidualBlock(width) for _ in range(depth)])
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x.flatten(1))))


class CNNBN(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = [1, 8, 16, 16, 32]
        for i, (a, b) in enumerate(zip(channels, channels[1:])):
            layers += [nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU()]
            if i % 2 == 1:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        return self.fc(self.dropout(h.mean(dim=(2, 3))))


class ResNet(nn.Module):
    """A small CIFAR-style ResNet: stem, three stages (two downsampling, projection shortcuts)."""

    def __init__(self, classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        stages = []
        c = width
        for i, c_out in enumerate((width, 2 * width, 4 * width)):
            stride = 1 if i == 0 else 2
            stages += [BasicBlock(c, c_out, stride), BasicBlock(c_out, c_out, 1)]
            c = c_out
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stages(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


class GPTBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """GPT-style: token + learned position embeddings, causal attention, output head tied to the embedding."""

    def __init__(self, vocab: int = 50, dim: int = 32, layers: int = 4, heads: int = 4, ctx: int = 16) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(ctx, dim)
        self.drop = nn.Dropout(0.1)
        self.h = nn.ModuleList(GPTBlock(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        b, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class Inception(nn.Module):
    """Inception-style modules: parallel branches joined by concatenation."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.mods = nn.ModuleList(self._module(16) for _ in range(3))
        self.fc = nn.Linear(16, classes)

    @staticmethod
    def _module(c: int) -> nn.ModuleDict:
        return nn.ModuleDict({
            "b1": nn.Conv2d(c, c // 4, 1),
            "b3": nn.Sequential(nn.Conv2d(c, c // 4, 1), nn.ReLU(), nn.Conv2d(c // 4, c // 4, 3, padding=1)),
            "b5": nn.Sequential(nn.Conv2d(c, c // 4, 1), nn.ReLU(), nn.Conv2d(c // 4, c // 4, 5, padding=2)),
            "pool": nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(c, c // 4, 1)),
        })

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        for m in self.mods:
            h = torch.relu(torch.cat([m["b1"](h), m["b3"](h), m["b5"](h), m["pool"](h)], dim=1))
        return self.fc(h.mean(dim=(2, 3)))


class MaskedEncoder(nn.Module):
    """A token model whose padding mask and positions are context: parameter-free functions of the input."""

    def __init__(self, vocab: int = 30, dim: int = 16, layers: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.pos_scale = nn.Parameter(torch.ones(dim))
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.out = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = (tokens != 0).unsqueeze(-1).float()
        positions = torch.arange(tokens.shape[1], device=tokens.device).float().unsqueeze(-1) / tokens.shape[1]
        h = self.emb(tokens) + positions * self.pos_scale
        for layer in self.layers:
            h = h + torch.tanh(layer(h)) * mask
        return self.out((h * mask).sum(1) / mask.sum(1).clamp(min=1))


class TwoInputs(nn.Module):
    """Two inputs: an image and a side vector that joins halfway."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 8 * 8, 32)
        self.fc2 = nn.Linear(32, 32)
        self.side = nn.Linear(6, 32)
        self.fc3 = nn.Linear(32, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, image: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(image)).flatten(1)
        h = torch.relu(self.fc1(h))
        h = torch.relu(self.fc2(h)) * torch.sigmoid(extra.sum(-1, keepdim=True))
        h = torch.relu(self.fc3(h + self.side(extra)))
        return self.head(h)


class MixerLayer(nn.Module):
    def __init__(self, tokens: int, dim: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.token_mlp = nn.Sequential(nn.Linear(tokens, 2 * tokens), nn.GELU(), nn.Linear(2 * tokens, tokens))
        self.channel_mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class MLPMixer(nn.Module):
    """MLP-Mixer: patch embedding by a strided conv, token- and channel-mixing MLPs, mean pooling."""

    def __init__(self, image: int = 16, patch: int = 4, dim: int = 24, layers: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        self.layers = nn.Sequential(*[MixerLayer((image // patch) ** 2, dim) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.layers(h)).mean(dim=1))


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if h.sum() > 0:
            return self.b(h)
        return h


class TupleOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.a(x)
        return self.b(h), h


class RecurrentClassifier(nn.Module):
    """``nn.RNN``/``nn.GRU``/``nn.LSTM`` over (batch, time, features), classified at the last step. With
    ``batch_first=False`` the module runs time-major (the model's input stays batch-first). Given
    ``h0`` (and ``c0`` for an LSTM), each (batch, layers, hidden), the initial state is an input."""

    def __init__(self, kind: str = "GRU", layers: int = 1, batch_first: bool = True,
                 d_in: int = 5, hidden: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.rnn = getattr(nn, kind)(d_in, hidden, layers, batch_first=batch_first)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor, h0: torch.Tensor | None = None, c0: torch.Tensor | None = None) -> torch.Tensor:
        hx = None if h0 is None else h0.transpose(0, 1) if c0 is None else (h0.transpose(0, 1), c0.transpose(0, 1))
        out, _ = self.rnn(x if self.batch_first else x.transpose(0, 1), hx)
        return self.fc(out[:, -1] if self.batch_first else out[-1])


class CellLoop(nn.Module):
    """A hand-written Python loop over ``nn.RNNCell``/``nn.GRUCell``/``nn.LSTMCell``, read out at the end."""

    def __init__(self, kind: str = "GRUCell", d_in: int = 5, hidden: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.cell = getattr(nn, kind)(d_in, hidden)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], self.cell.hidden_size)
        c = h
        for t in range(x.shape[1]):
            if isinstance(self.cell, nn.LSTMCell):
                h, c = self.cell(x[:, t], (h, c))
            else:
                h = self.cell(x[:, t], h)
        return self.fc(h)


def units_trained(m: hc.HBLLModel, owners: dict[Unit, set[int]], inputs: tuple[torch.Tensor, ...],
                  target: torch.Tensor, steps: int) -> list[Unit]:
    """Run ``steps`` training steps of ``m`` on one batch, asserting that each update task changes the
    ``.grad`` of no parameter outside its unit's ``owners`` entry (parameter ids); returns the units whose
    update changed a gradient, in order. The hook is removed before returning, so the list stops growing."""
    trained: list[Unit] = []
    before: dict[int, torch.Tensor | None] = {}

    def grads() -> dict[int, torch.Tensor | None]:
        return {id(p): None if p.grad is None else p.grad.clone() for p in m.parameters()}

    def observe(task: Task, done: bool) -> None:
        if task.kind not in (TaskKind.BLOCK_UPDATE, TaskKind.COUPLER_UPDATE):
            return
        if not done:
            before.clear()
            before.update(grads())
            return
        changed = {k for k, g in grads().items()
                   if g is not None and (before[k] is None or not torch.equal(before[k], g))}
        assert changed <= owners[task.unit], f"{task.kind} {task.unit} leaked gradient into other units"
        if changed:
            trained.append(task.unit)

    handle = m.register_task_hook(observe)
    try:
        for _ in range(steps):
            m.zero_grad()
            m.training_step(*inputs, target=target)
    finally:
        handle.remove()
    return trained


class RecurrentLM(nn.Module):
    """A token-level language model: embedding, ``nn.GRU``/``nn.LSTM`` (time-major inside when
    ``batch_first=False``) and a readout of every step, returning (batch, time, vocab) logits; with
    ``cell`` set, a hand-written loop over that cell class that stacks each step's readout instead."""

    def __init__(self, kind: str = "LSTM", layers: int = 1, batch_first: bool = True, vocab: int = 11,
                 dim: int = 5, hidden: int = 8, cell: str | None = None) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(vocab, dim)
        self.rnn = getattr(nn, cell)(dim, hidden) if cell else getattr(nn, kind)(dim, hidden, layers,
                                                                                 batch_first=batch_first)
        self.fc = nn.Linear(hidden, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.embed(ids)
        if isinstance(self.rnn, nn.RNNCellBase):
            h = c = e.new_zeros(e.shape[0], self.rnn.hidden_size)
            outs = []
            for t in range(e.shape[1]):
                if isinstance(self.rnn, nn.LSTMCell):
                    h, c = self.rnn(e[:, t], (h, c))
                else:
                    h = self.rnn(e[:, t], h)
                outs.append(self.fc(h))
            return torch.stack(outs, dim=1)
        out = self.rnn(e if self.batch_first else e.transpose(0, 1))[0]
        return self.fc(out if self.batch_first else out.transpose(0, 1))


@dataclass(frozen=True)
class Case:
    name: str
    factory: Callable[[], nn.Module]
    inputs: Callable[[int], tuple[torch.Tensor, ...]]
    blocks: tuple[int, ...]

    def build(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.factory()

    def example(self, batch: int = 4, seed: int = 1) -> tuple[torch.Tensor, ...]:
        torch.manual_seed(seed)
        return self.inputs(batch)


ZOO: dict[str, Case] = {c.name: c for c in [
    Case("mlp", MLP, lambda b: (torch.randn(b, 20),), (2, 4, 7)),
    Case("resmlp", ResMLP, lambda b: (torch.randn(b, 20),), (2, 4, 8)),
    Case("cnn_bn", CNNBN, lambda b: (torch.randn(b, 1, 16, 16),), (2, 4)),
    Case("resnet", ResNet, lambda b: (torch.randn(b, 3, 16, 16),), (2, 4, 8)),
    Case("gpt", GPT, lambda b: (torch.randint(0, 50, (b, 16)),), (2, 4, 8)),
    Case("inception", Inception, lambda b: (torch.randn(b, 3, 12, 12),), (2, 4)),
    Case("mixer", MLPMixer, lambda b: (torch.randn(b, 3, 16, 16),), (2, 4, 8)),
    Case("masked", MaskedEncoder, lambda b: (torch.randint(0, 30, (b, 7)),), (2, 4)),
    Case("two_inputs", TwoInputs, lambda b: (torch.randn(b, 1, 8, 8), torch.randn(b, 6)), (2, 4)),
]}


def seq_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over every position of a (B, T, V) output."""
    return F.cross_entropy(out.flatten(0, -2), y.flatten())


def loss_for(case: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The task loss of a zoo case: per-token cross-entropy for the GPT, cross-entropy otherwise."""
    return seq_loss if case == "gpt" else F.cross_entropy


def targets(case: str, batch: int) -> torch.Tensor:
    """Random class targets that fit a zoo case's output."""
    if case == "gpt":
        return torch.randint(0, 50, (batch, 16))
    classes = {"mlp": 5, "resmlp": 5, "masked": 3, "two_inputs": 4}.get(case, 10)
    return torch.randint(0, classes, (batch,))


def compile_case(case: str, n: int, **config: object) -> hc.HBLLModel:
    """A zoo case compiled at ``n`` blocks with its loss and ``HBLLConfig(**config)``."""
    c = ZOO[case]
    return hc.hbll_compile(c.build(), c.example(), blocks=n, loss=loss_for(case), config=hc.HBLLConfig(**config))


def train_on_teacher(config: dict, steps: int = 80) -> tuple[hc.HBLLModel, torch.Tensor, torch.Tensor, list[float]]:
    """The zoo MLP at N=4 under ``HBLLConfig(**config)``, trained ``steps`` AdamW steps on one batch
    labelled by a random linear teacher; returns the model, the batch, its labels and the eval-mode
    loss after every step."""
    torch.manual_seed(0)
    teacher = torch.nn.Linear(20, 5)
    x = torch.randn(256, 20)
    y = teacher(x).argmax(-1)
    m = compile_case("mlp", 4, **config)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        m.training_step(x, target=y)
        opt.step()
        with torch.no_grad():
            losses.append(F.cross_entropy(m.eval()(x), y).item())
        m.train()
    return m, x, y, losses


fuzz = settings(
    max_examples=1000 if os.environ.get("HBLL_HYPOTHESIS_PROFILE") == "thorough" else 12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
"""Settings of the fuzzing properties (bad arguments): 12 examples in the default run, 1,000 with
``HBLL_HYPOTHESIS_PROFILE=thorough``. Other properties keep their own settings."""

GOLDEN = Path(__file__).parent / "golden"
"""Expected texts of generated code and schedules; ``HBLL_UPDATE_GOLDEN=1 pytest`` rewrites them."""


def assert_golden(name: str, text: str) -> None:
    """Compare ``text`` with ``tests/golden/<name>``, or rewrite that file when ``HBLL_UPDATE_GOLDEN=1``
    (review the diff before committing it)."""
    path = GOLDEN / name
    if os.environ.get("HBLL_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.is_file(), f"no golden file {path}; create it with HBLL_UPDATE_GOLDEN=1"
    expected = path.read_text()
    assert text == expected, f"{name} changed; if intended, regenerate with HBLL_UPDATE_GOLDEN=1 and review the diff"


def write_cifar_batch(path: Path, start: int, n: int, label_key: bytes) -> None:
    """A CIFAR-format pickle; image k has every byte of its red channel = start + k."""
    images = np.zeros((n, 3072), dtype=np.uint8)
    images[:, :1024] = (start + np.arange(n))[:, None]
    images[:, 2048:] = 255
    batch = {b"data": images, label_key: [(start + k) % 10 for k in range(n)], b"batch_label": b"x"}
    with open(path, "wb") as fh:
        pickle.dump(batch, fh)


def write_cifar10(folder: Path) -> None:
    """A tiny CIFAR-10 folder in the exact python-batch format (15 train, 4 test images)."""
    folder.mkdir(parents=True)
    for i in range(1, 6):
        write_cifar_batch(folder / f"data_batch_{i}", start=10 * i, n=3, label_key=b"labels")
    write_cifar_batch(folder / "test_batch", start=100, n=4, label_key=b"labels")
