"""HBLL-RNN (DESIGN §4): recurrent models compiled with over="time" into chunks of time steps."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import CellLoop, RecurrentClassifier, RecurrentLM, seq_loss, units_trained
from torch import nn

import hbll_compile as hc
from hbll_compile.cli import main as cli
from hbll_compile.runtime.objectives import emitted_loss
from hbll_compile.runtime.schedule import Task, TaskKind, Unit

T, D, H, CLASSES = 6, 5, 8, 3


def _inputs(batch: int, layers: int = 1, states: int = 0, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, T, D, generator=g), *(torch.randn(batch, layers, H, generator=g) for _ in range(states)))


def _compile(net: nn.Module, blocks: int = 3, states: int = 0, layers: int = 1, **config: object) -> hc.HBLLModel:
    return hc.hbll_compile(net, _inputs(4, layers, states), blocks=blocks, loss=F.cross_entropy, over="time",
                           config=hc.HBLLConfig(**config))  # type: ignore[arg-type]


def _y(batch: int) -> torch.Tensor:
    return torch.arange(batch) % CLASSES


def _cells_per_chunk(m: hc.HBLLModel) -> list[int]:
    return [sum("_cell" in name for name in spec.nodes) for spec in m.specs]


@pytest.mark.parametrize("kind", ["RNN", "GRU", "LSTM"])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("batch_first", [True, False])
def test_recurrent_module_equals_the_model(kind: str, layers: int, batch_first: bool) -> None:
    torch.manual_seed(0)
    net = RecurrentClassifier(kind, layers, batch_first, D, H, CLASSES)
    m = _compile(net)
    assert m.to_original() is net and len(m.blocks) == 3
    assert sum(_cells_per_chunk(m)) == T * layers  # every layer of every step, once
    assert all(b.shape == (H * layers * (2 if kind == "LSTM" else 1),) for b in m.boundaries[1:-1])  # packed state
    for batch in (4, 7):
        x = _inputs(batch, seed=batch)
        torch.testing.assert_close(m(*x), net(*x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["RNNCell", "GRUCell", "LSTMCell"])
def test_hand_written_cell_loop_equals_the_model(kind: str) -> None:
    torch.manual_seed(0)
    net = CellLoop(kind, D, H, CLASSES)
    m = _compile(net, blocks=T)  # one step per chunk
    assert _cells_per_chunk(m) == [1] * T
    x = _inputs(7, seed=1)
    torch.testing.assert_close(m(*x), net(*x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
def test_initial_state_as_input(kind: str) -> None:
    torch.manual_seed(0)
    net = RecurrentClassifier(kind, 2, True, D, H, CLASSES)
    states = 2 if kind == "LSTM" else 1
    m = _compile(net, states=states, layers=2)
    x = _inputs(5, layers=2, states=states, seed=3)
    torch.testing.assert_close(m(*x), net(*x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("objective", ["hbll", "bp", "tbptt", "dgl"])
def test_trained_weights_are_the_modules_own(objective: str) -> None:
    torch.manual_seed(0)
    net = RecurrentClassifier("LSTM", 2, True, D, H, CLASSES)
    m = _compile(net, objective=objective)
    own = {id(p) for p in net.parameters()}
    assert all({id(p) for p in block.parameters()} <= own for block in m.blocks)
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    optimizer = torch.optim.SGD(m.parameters(), lr=0.1)
    x, y = _inputs(8, seed=4), _y(8)
    for _ in range(len(m.blocks) + 1):  # past the wavefront warm-up
        optimizer.zero_grad()
        loss = m.training_step(*x, target=y)
        optimizer.step()
    assert math.isfinite(loss.item())
    assert not torch.equal(before["rnn.weight_hh_l1"], net.rnn.weight_hh_l1)
    assert not torch.equal(before["fc.weight"], net.fc.weight)
    torch.testing.assert_close(m(*x), net(*x), atol=1e-5, rtol=0)


def _eager_truncated_grads(net: CellLoop, x: torch.Tensor, y: torch.Tensor, start: int) -> list[torch.Tensor]:
    """Truncated BPTT by hand: steps before ``start`` without gradient, the rest from a detached state."""
    h = x.new_zeros(x.shape[0], H)
    with torch.no_grad():
        for t in range(start):
            h = net.cell(x[:, t], h)
    for t in range(start, x.shape[1]):
        h = net.cell(x[:, t], h)
    return list(torch.autograd.grad(F.cross_entropy(net.fc(h), y), list(net.parameters())))


def test_tbptt_equals_truncated_backprop_by_hand() -> None:
    """No gradient crosses a chunk boundary: the last chunk's update is exactly eager BPTT truncated at
    its first step, and the earlier chunks (with no output of their own) get no gradient."""
    torch.manual_seed(0)
    net = CellLoop("GRUCell", D, H, CLASSES)
    m = _compile(net, blocks=3, objective="tbptt")
    x, y = _inputs(6, seed=5)[0], _y(6)
    m.zero_grad()
    m.training_step(x, target=y)
    start = sum(_cells_per_chunk(m)[:-1])
    assert 0 < start < T
    for p, expected in zip(net.parameters(), _eager_truncated_grads(net, x, y, start)):
        assert p.grad is not None
        torch.testing.assert_close(p.grad, expected, atol=1e-6, rtol=1e-5)
    tasks = m.schedule.tasks()
    assert [t.unit for t in tasks if t.kind is TaskKind.BLOCK_UPDATE] == [Unit.block(3)]


def test_bp_equals_full_bptt() -> None:
    torch.manual_seed(0)
    net = RecurrentClassifier("LSTM", 2, True, D, H, CLASSES)
    m = _compile(net, objective="bp")
    x, y = _inputs(6, seed=6), _y(6)
    expected = torch.autograd.grad(F.cross_entropy(net(*x), y), list(net.parameters()))
    m.zero_grad()
    m.training_step(*x, target=y)
    for p, g in zip(net.parameters(), expected):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("inputs", ["wavefront", "tree"])
def test_no_gradient_crosses_units_over_time(inputs: str) -> None:
    """A chunk update reaches only the shared recurrent weights, the readout and its local head, a coupler
    update only that coupler; every chunk and coupler gets a gradient."""
    torch.manual_seed(0)
    net = RecurrentClassifier("GRU", 2, True, D, H, CLASSES)
    m = _compile(net, blocks=4, inputs=inputs)
    owners = {Unit.block(i): set(map(id, net.parameters())) for i in range(1, 5)}
    for key, head in m.heads.items():  # a block's update trains its fused local head too
        owners[Unit.block(int(key))] |= set(map(id, head.parameters()))
    owners |= {Unit.coupler(int(k)): set(map(id, c.parameters())) for k, c in m.couplers.items()}
    trained = units_trained(m, owners, _inputs(8, seed=7), _y(8), steps=5)
    assert set(trained) == set(owners)


@pytest.mark.parametrize("n", [4, 8])
def test_critical_path_is_logarithmic_in_chunks(n: int) -> None:
    torch.manual_seed(0)
    net = CellLoop("GRUCell", D, H, CLASSES)
    x = torch.randn(4, 16, D)
    m = hc.hbll_compile(net, (x,), blocks=n, loss=F.cross_entropy, over="time")
    bp = hc.hbll_compile(net, (x,), blocks=n, over="time", config=hc.HBLLConfig(objective="bp"))
    assert m.schedule.critical_path() == 2 * math.ceil(math.log2(n)) + 2
    assert bp.schedule.critical_path() == 2 * n


def test_time_couplers_invert_exactly_for_fixed_inputs() -> None:
    torch.manual_seed(0)
    net = RecurrentClassifier("LSTM", 2, True, D, H, CLASSES)
    m = _compile(net, blocks=4)
    plan = next(p for p in m.coupler_plans if not p.runs_tail)
    assert plan.condition  # conditioned on the span's per-step inputs
    coupler = m.couplers[str(plan.node)]
    with torch.no_grad():
        for p in coupler.parameters():
            p.normal_(0, 0.3)  # a trained-looking coupler, not the identity it starts as
    x = _inputs(5, seed=8)
    env = m.environment(*x)
    cond = coupler.encode(torch.cat([env[name].flatten(1) for name in plan.condition], dim=1))
    h = torch.randn(5, *m.boundaries[plan.source].shape)
    out = coupler(h, cond)
    assert not torch.allclose(out, h)
    torch.testing.assert_close(coupler.inverse(out, cond), h, atol=1e-4, rtol=1e-4)  # float32 rounding
    exact = coupler.double()  # exact up to float64 rounding
    torch.testing.assert_close(exact.inverse(exact(h.double(), cond.double()), cond.double()), h.double(),
                               atol=1e-10, rtol=0)
    other = torch.randn(5, coupler.cond_dim, dtype=torch.float64)
    assert not torch.allclose(exact(h.double(), other), out.double())  # the inputs matter
    m.float()
    assert m(*x, depth=1).shape == net(*x).shape


def test_recurrent_flops_are_counted() -> None:
    """A whole nn.LSTM counts its matrix products (it counted 0), the same total as unrolled over time."""
    torch.manual_seed(0)
    net = RecurrentClassifier("LSTM", 2, True, D, H, CLASSES)
    depth = hc.hbll_compile(net, _inputs(4), blocks=1)
    time = _compile(net, blocks=3)
    per_step = 2 * 4 * ((D + H) * 4 * H + (H + H) * 4 * H)
    assert sum(s.flops for s in depth.specs) == sum(s.flops for s in time.specs) == T * per_step + 2 * 4 * H * CLASSES


class _Embedded(nn.Module):
    """Token ids embedded over the whole sequence, then a time-major 2-layer LSTM."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, D)
        self.rnn = nn.LSTM(D, H, 2)
        self.fc = nn.Linear(H, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.rnn(torch.relu(self.embed(ids)).transpose(0, 1))[0][-1])


class _Projected(nn.Module):
    """An input projection and LayerNorm over the whole sequence before a GRU; with ``skip`` the
    projected sequence is read again after the loop, so more than the state crosses every time cut."""

    def __init__(self, skip: bool = False) -> None:
        super().__init__()
        self.skip = skip
        self.proj, self.norm = nn.Linear(D, H), nn.LayerNorm(H)
        self.rnn = nn.GRU(H, H, batch_first=True)
        self.fc = nn.Linear(H, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.norm(torch.tanh(self.proj(x)))
        last = self.rnn(p)[0][:, -1]
        return self.fc(last + p.mean(1) if self.skip else last)


class _Convolved(nn.Module):
    """A convolution over time before a GRU: it mixes neighbouring steps, so it cannot run per step."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(D, D, 3, padding=1)
        self.rnn = nn.GRU(D, H, batch_first=True)
        self.fc = nn.Linear(H, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.rnn(self.conv(x.transpose(1, 2)).transpose(1, 2))[0][:, -1])


@pytest.mark.parametrize("net", [_Embedded(), _Projected()], ids=["embedding", "projection"])
def test_layers_before_the_recurrent_module_run_per_step(net: nn.Module) -> None:
    """An embedding or input projection over the whole sequence is applied per step inside the chunks."""
    ids = isinstance(net, _Embedded)
    example = torch.randint(0, 11, (4, T)) if ids else _inputs(4)[0]
    m = hc.hbll_compile(net, (example,), blocks=3, loss=F.cross_entropy, over="time")
    first_op = "embedding" if ids else "linear"
    per_chunk = [sum(name.startswith(first_op) for name in spec.nodes) for spec in m.specs]
    layers = 2 if ids else 1
    assert per_chunk[:-1] == [c // layers for c in _cells_per_chunk(m)][:-1] and sum(per_chunk) == T + (0 if ids else 1)
    x = torch.randint(0, 11, (7, T)) if ids else _inputs(7, seed=2)[0]
    torch.testing.assert_close(m(x), net(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("net", "error", "words"), [
    (RecurrentClassifier("GRU", 1, True, D, H, CLASSES), None, ""),
    (nn.Sequential(nn.Flatten(), nn.Linear(T * D, CLASSES)), hc.CutError, "no recurrent module"),
    (_Projected(skip=True), hc.CutError, "only the recurrent state crosses"),
    (_Convolved(), hc.CutError, "only the recurrent state crosses"),
])
def test_refusals_name_the_reason(net: nn.Module, error: type[Exception] | None, words: str) -> None:
    if error is None:
        net.rnn = nn.GRU(D, H, batch_first=True, bidirectional=True)  # type: ignore[assignment]
        net.fc = nn.Linear(2 * H, CLASSES)  # type: ignore[assignment]
        error, words = hc.CaptureError, "bidirectional"
    with pytest.raises(error, match=words) as info:
        _compile(net)
    assert info.value.remedy


def test_time_only_options_are_refused_elsewhere() -> None:
    net = RecurrentClassifier("GRU", 1, True, D, H, CLASSES)
    with pytest.raises(hc.CompileError, match="tbptt"):
        hc.hbll_compile(net, _inputs(4), blocks=2, config=hc.HBLLConfig(objective="tbptt"))
    with pytest.raises(hc.CompileError, match="batched"):
        _compile(net, executor="batched")
    with pytest.raises(hc.CompileError, match="over must be"):
        hc.hbll_compile(net, _inputs(4), blocks=2, over="space")  # type: ignore[arg-type]


def test_save_load_and_fidelity_refusal(tmp_path: object) -> None:
    torch.manual_seed(0)
    net = RecurrentClassifier("LSTM", 2, True, D, H, CLASSES)
    m = _compile(net, blocks=3)
    x, y = _inputs(6, seed=9), _y(6)
    for _ in range(4):
        m.training_step(*x, target=y)
    path = f"{tmp_path}/m.safetensors"
    m.save(path)
    torch.manual_seed(1)
    loaded = hc.HBLLModel.load(path, lambda: RecurrentClassifier("LSTM", 2, True, D, H, CLASSES), loss=F.cross_entropy)
    assert loaded.config.over == "time"
    torch.testing.assert_close(loaded(*x), m(*x), atol=0, rtol=0)
    torch.testing.assert_close(loaded(*x, depth=1), m(*x, depth=1), atol=0, rtol=0)
    with pytest.raises(hc.TrainingError, match="share one set of weights"):
        m.gradient_report(*x, target=y)


def test_cli_inspects_over_time(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    factory = tmp_path / "gru.py"
    factory.write_text("from helpers import RecurrentClassifier\n\ndef build():\n    return RecurrentClassifier()\n")
    code = cli(["inspect", f"{factory}:build", "--input-shape", f"4,{T},{D}", "--blocks", "3", "--over", "time"])
    out = capsys.readouterr().out
    assert code == 0 and "gru_cell" in out and "critical path 6" in out


# -- emitted per-step outputs (language models) -------------------------------------------------------
VOCAB = 11


def _lm_compile(net: nn.Module, blocks: int = 3, loss: object = seq_loss, **config: object) -> hc.HBLLModel:
    ids = torch.randint(0, VOCAB, (4, T), generator=torch.Generator().manual_seed(0))
    return hc.hbll_compile(net, (ids,), blocks=blocks, loss=loss, over="time",  # type: ignore[arg-type]
                           config=hc.HBLLConfig(**config))  # type: ignore[arg-type]


def _tokens(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, T), generator=g), torch.randint(0, VOCAB, (batch, T), generator=g)


@pytest.mark.parametrize(("kind", "layers", "batch_first"), [("LSTM", 1, True), ("LSTM", 2, False), ("GRU", 2, True),
                                                             ("RNN", 1, False)])
def test_language_model_equals_the_model(kind: str, layers: int, batch_first: bool) -> None:
    """A readout of every step compiles over time: each chunk emits its steps' outputs, and their
    concatenation is the model's output."""
    torch.manual_seed(0)
    net = RecurrentLM(kind, layers, batch_first)
    m = _lm_compile(net, blocks=3)
    assert m.emission is not None and m.emission.dim == 1 and m.emission.length == T
    assert m.emission.steps == (2, 2, 2) and m.emission.step_shape == (VOCAB,)
    assert m.boundaries[-1].shape == ((2 if kind == "LSTM" else 1) * layers * 8,)  # the final packed state
    x, _ = _tokens(7, seed=1)
    torch.testing.assert_close(m(x), net(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("cell", ["GRUCell", "LSTMCell"])
def test_hand_written_language_model_loop_equals_the_model(cell: str) -> None:
    torch.manual_seed(0)
    net = RecurrentLM(cell=cell)
    m = _lm_compile(net, blocks=2)
    assert m.emission is not None and m.emission.steps == (3, 3)
    x, _ = _tokens(5, seed=2)
    torch.testing.assert_close(m(x), net(x), atol=1e-5, rtol=0)


def test_bp_with_emitted_outputs_equals_full_bptt() -> None:
    torch.manual_seed(0)
    net = RecurrentLM("LSTM", 2)
    m = _lm_compile(net, objective="bp")
    x, y = _tokens(6, seed=3)
    expected = torch.autograd.grad(seq_loss(net(x), y), list(net.parameters()))
    m.zero_grad()
    loss = m.training_step(x, target=y)
    torch.testing.assert_close(loss, seq_loss(net(x), y).detach())
    for p, g in zip(net.parameters(), expected):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5)


def _eager_truncated_lm_grads(net: RecurrentLM, x: torch.Tensor, y: torch.Tensor, chunks: list[tuple[int, int]],
                              reduction: str) -> list[torch.Tensor]:
    """Truncated BPTT by hand with the module itself: each chunk's steps from its detached initial state,
    each chunk's loss its share of the whole sequence's loss."""
    total = torch.zeros(())
    loss = F.cross_entropy if reduction == "mean" else lambda o, t: F.cross_entropy(o, t, reduction="sum")
    for a, b in chunks:
        with torch.no_grad():
            state = net.rnn(net.embed(x[:, :a]))[1] if a else None
        out = net.rnn(net.embed(x[:, a:b]), state)[0]
        piece = loss(net.fc(out).flatten(0, 1), y[:, a:b].flatten())
        total = total + (piece * (b - a) / T if reduction == "mean" else piece)
    return list(torch.autograd.grad(total, list(net.parameters())))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_tbptt_with_emitted_outputs_equals_truncated_backprop_by_hand(reduction: str) -> None:
    """Every chunk trains on its own steps' share of the loss, from its detached initial state; with a
    summed loss the shares are the chunks' sums. The reported loss is the whole sequence's."""
    torch.manual_seed(0)
    net = RecurrentLM("LSTM")
    loss = seq_loss if reduction == "mean" else (
        lambda o, t: F.cross_entropy(o.flatten(0, 1), t.flatten(), reduction="sum"))
    m = _lm_compile(net, loss=loss, objective="tbptt")
    x, y = _tokens(6, seed=4)
    m.zero_grad()
    reported = m.training_step(x, target=y)
    assert m.reduction == reduction and m.emission is not None
    torch.testing.assert_close(reported, loss(net(x), y).detach())
    chunks = [m.emission.span(i) for i in range(1, 4)]
    for p, g in zip(net.parameters(), _eager_truncated_lm_grads(net, x, y, chunks, reduction)):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5)
    assert [t.unit for t in m.schedule.tasks() if t.kind is TaskKind.BLOCK_UPDATE] == [Unit.block(i) for i in (1, 2, 3)]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_a_coupler_readout_carries_one_steps_share(reduction: str) -> None:
    """The share of some steps' outputs is what they add to the whole loss: the chunks' shares sum to
    the task loss, and the one output a coupler's estimate is read out to counts as one step (weighting
    it as every step the coupler skips made a char-level LSTM diverge)."""
    torch.manual_seed(0)
    loss = seq_loss if reduction == "mean" else (
        lambda o, t: F.cross_entropy(o.flatten(0, 1), t.flatten(), reduction="sum"))
    m = _lm_compile(RecurrentLM("GRU"), blocks=4, loss=loss)
    x, y = _tokens(5, seed=9)
    m.training_step(x, target=y)
    assert m.reduction == reduction and m.emission is not None
    with torch.no_grad():
        out = m(x)
        shares = [emitted_loss(m, out[:, a:b], y, (a, b)) for a, b in map(m.emission.span, range(1, 5))]
        torch.testing.assert_close(sum(shares), loss(out, y))
        one = loss(out[:, T - 1 : T], y[:, T - 1 : T]) / (T if reduction == "mean" else 1)
        torch.testing.assert_close(emitted_loss(m, out[:, T - 1 : T], y, (T - 1, T)), one)


@pytest.mark.parametrize("inputs", ["wavefront", "tree"])
def test_no_gradient_crosses_units_with_emitted_outputs(inputs: str) -> None:
    """A chunk update reaches only the shared weights (its own steps' share and its path's), a coupler
    update only that coupler; every unit trains, there are no local heads, and the wavefront's critical
    path is below BPTT's."""
    torch.manual_seed(0)
    net = RecurrentLM("GRU", 2)
    m = _lm_compile(net, blocks=4, inputs=inputs)
    assert not m.heads and not any(p.runs_tail for p in m.coupler_plans)
    owners = {Unit.block(i): set(map(id, net.parameters())) for i in range(1, 5)}
    owners |= {Unit.coupler(int(k)): set(map(id, c.parameters())) for k, c in m.couplers.items()}
    x, y = _tokens(8, seed=5)
    trained = units_trained(m, owners, (x,), y, steps=5)
    assert math.isfinite(m.training_step(x, target=y).item())
    assert set(trained) == set(owners)
    if inputs == "wavefront":
        assert m.schedule.critical_path() < _lm_compile(net, blocks=4, objective="bp").schedule.critical_path()


def test_last_chunk_of_hbll_trains_on_its_own_steps_alone() -> None:
    """Oracle: block N's path is empty, so its update is exactly its steps' share of the loss from its
    detached initial state (truncated BPTT's last chunk)."""
    torch.manual_seed(0)
    net = RecurrentLM("LSTM")
    m = _lm_compile(net, blocks=2, inputs="tree")
    x, y = _tokens(6, seed=6)
    grads: dict[int, list[torch.Tensor]] = {}

    def observe(task: Task, done: bool) -> None:
        if task.kind is TaskKind.BLOCK_UPDATE and task.unit == Unit.block(2):
            if not done:
                m.zero_grad()
            else:
                grads[2] = [p.grad.clone() for p in net.parameters()]  # type: ignore[union-attr]

    m.register_task_hook(observe)
    m.training_step(x, target=y)
    assert m.emission is not None
    a, b = m.emission.span(2)
    with torch.no_grad():
        state = net.rnn(net.embed(x[:, :a]))[1]
    piece = seq_loss(net.fc(net.rnn(net.embed(x[:, a:]), state)[0]), y[:, a:]) * (b - a) / T
    for g, expected in zip(grads[2], torch.autograd.grad(piece, list(net.parameters()))):
        torch.testing.assert_close(g, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("loss", "target", "words"), [
    (lambda o, t: F.cross_entropy(o[:, -1], t[:, -1]), None, "does not decompose over time steps"),
    (lambda o, t: F.cross_entropy(o.flatten(0, 1), t.flatten()) ** 2, None, "does not decompose over time steps"),
    (seq_loss, torch.zeros(6, dtype=torch.long), "one target per step"),
])
def test_loss_that_does_not_split_over_steps_is_refused(loss: object, target: torch.Tensor | None, words: str) -> None:
    torch.manual_seed(0)
    m = _lm_compile(RecurrentLM("GRU"), loss=loss)
    x, y = _tokens(6, seed=7)
    with pytest.raises(hc.TrainingError, match=words) as info:
        m.training_step(x, target=y if target is None else target)
    assert info.value.remedy and all(p.grad is None for p in m.parameters())


def test_emitting_models_refuse_what_needs_a_last_step_output() -> None:
    torch.manual_seed(0)
    net = RecurrentLM("GRU")
    m = _lm_compile(net, blocks=2)
    x, _ = _tokens(3, seed=8)
    with pytest.raises(hc.CompileError, match="skips a span of steps"):
        m(x, depth=0)
    with pytest.raises(hc.CompileError, match="truncated BPTT"):
        _lm_compile(net, objective="dgl")
    with pytest.raises(hc.DistributedError, match="every time step"):
        hc.distribute(m)
    with pytest.raises(hc.ExportError, match="every time step"):
        hc.export_training_artifacts(m, "unused")
