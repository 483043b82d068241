"""The gradient-fidelity instrument: ``HBLLModel.gradient_report``, ``fit(diagnose_every=...)``,
``hbll diagnose`` and the plots."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import ZOO
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

import hbll_compile as hc
from hbll_compile.cli import main
from hbll_compile.errors import TrainingError
from hbll_compile.runtime.fidelity import _tree_estimate, plot_history, plot_report
from hbll_compile.runtime.schedule import Value


def _ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _compiled(name: str, blocks: int, **config: object) -> hc.HBLLModel:
    case = ZOO[name]
    return hc.hbll_compile(case.build(), case.example(2), blocks=blocks, loss=_ce, config=hc.HBLLConfig(**config))


def _batch(m: hc.HBLLModel, name: str, size: int = 8) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    inputs = ZOO[name].example(size, seed=3)
    classes = m.boundaries[-1].shape[-1]
    shape = (size, *m.boundaries[-1].shape[:-1])
    return inputs, torch.randint(0, classes, shape, generator=torch.Generator().manual_seed(4))


_shared = functools.cache(_compiled)
"""Compiled once per argument set, for tests that only read the model."""


@pytest.mark.parametrize(("name", "blocks", "inputs"), [
    ("mlp", 4, "wavefront"), ("resmlp", 8, "wavefront"), ("cnn_bn", 4, "wavefront"), ("gpt", 4, "wavefront"),
    ("resmlp", 8, "tree"), ("cnn_bn", 4, "tree"),
])
def test_exact_paths_give_bp_gradients(name: str, blocks: int, inputs: str) -> None:
    """The self-check: with every coupler replaced by its exact span (in paths and tree estimates),
    local gradients are BP's. The GPT's tied embedding collects both its uses; the CNN runs its
    BatchNorm and dropout in train mode, and at N=6 has a block without parameters (a pooling)."""
    m = _shared(name, blocks, inputs=inputs, local_head_weight=0)
    m.train()
    x, y = _batch(m, name)
    report = m.gradient_report(*x, target=y, paths="exact")
    assert len(report.blocks) == blocks
    for b, block in zip(report.blocks, m.blocks):
        if not any(p.requires_grad for p in block.parameters()):
            assert b.cosine is None and b.norm_ratio is None
            continue
        assert b.cosine == pytest.approx(1.0, abs=1e-5), b
        assert b.norm_ratio == pytest.approx(1.0, abs=1e-5), b
    assert report.global_cosine == pytest.approx(1.0, abs=1e-5)


def test_bp_objective_is_measured_with_exact_paths() -> None:
    m = _compiled("resmlp", 4, objective="bp")
    x, y = _batch(m, "resmlp")
    report = m.gradient_report(*x, target=y)
    assert report.paths == "exact"
    assert all(b.cosine == pytest.approx(1.0, abs=1e-5) for b in report.blocks)


def test_coupler_report_is_finite_and_bounded() -> None:
    m = _shared("resmlp", 8, inputs="wavefront", local_head_weight=0)
    x, y = _batch(m, "resmlp")
    report = m.gradient_report(*x, target=y)
    assert [c.span for c in report.couplers] == [n.span for n in m.tree.internal_nodes]
    for b in report.blocks:
        assert -1 <= b.cosine <= 1 and math.isfinite(b.norm_ratio) and b.norm_ratio > 0
    assert -1 <= report.global_cosine <= 1
    for c in report.couplers:
        assert c.consistency_error is not None and math.isfinite(c.consistency_error) and c.consistency_error >= 0
        assert -1 <= c.vjp_cosine <= 1 and -1 <= c.grad_vjp_cosine <= 1
    # untrained couplers are not their spans: the report must see that some paths are inexact
    assert min(b.cosine for b in report.blocks) < 0.999
    # the last block's path is empty and the one before runs block N exactly: both are exact
    assert report.blocks[-1].cosine == pytest.approx(1.0, abs=1e-6)
    assert report.blocks[-2].cosine == pytest.approx(1.0, abs=1e-6)


@settings(max_examples=8, deadline=None)
@given(size=st.integers(2, 12), seed=st.integers(0, 2**16))
def test_report_values_stay_in_range(size: int, seed: int) -> None:
    m = _shared("resmlp", 4, inputs="wavefront")
    x = torch.randn(size, 20, generator=torch.Generator().manual_seed(seed))
    y = torch.randint(0, 5, (size,), generator=torch.Generator().manual_seed(seed + 1))
    report = m.gradient_report(x, target=y, probes=2)
    values = [b.cosine for b in report.blocks] + [c.vjp_cosine for c in report.couplers]
    values += [c.grad_vjp_cosine for c in report.couplers]
    assert all(v is not None and -1 - 1e-9 <= v <= 1 + 1e-9 for v in values)
    assert all(math.isfinite(c.consistency_error) for c in report.couplers)


def test_report_is_deterministic() -> None:
    """Twice the same numbers, also with dropout and BatchNorm in train mode (cnn_bn)."""
    m = _shared("cnn_bn", 4, inputs="tree")
    m.train()
    x, y = _batch(m, "cnn_bn")
    assert m.gradient_report(*x, target=y) == m.gradient_report(*x, target=y)


@pytest.mark.parametrize("training", [True, False])
def test_report_changes_no_state(training: bool) -> None:
    """Weights, .grad, BatchNorm statistics, the RNG, the mode and the wavefront ring are as before."""
    m = _compiled("cnn_bn", 4)
    optimizer = torch.optim.AdamW(m.parameters(), lr=1e-3)
    for _ in range(6):  # N + 2 steps: the ring is full
        x, y = _batch(m, "cnn_bn")
        optimizer.zero_grad()
        m.training_step(*x, target=y)
        optimizer.step()
    m.train(training)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    grads = {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}
    ring = [(b.inputs[0], b.y, {k: v.clone() for k, v in b.h.items()}) for b in m._executor.ring]
    rng = torch.get_rng_state()
    assert len(ring) == 5 and any(name.startswith("blocks.") and "running_mean" in name for name in state)

    m.gradient_report(*x, target=y)

    torch.testing.assert_close(m.state_dict(), state, rtol=0, atol=0)
    assert {k: p.grad for k, p in m.named_parameters() if p.grad is not None}.keys() == grads.keys()
    for k, p in m.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads[k], rtol=0, atol=0)
    assert torch.equal(torch.get_rng_state(), rng)
    assert m.training is training and m.to_original().training is training
    assert len(m._executor.ring) == len(ring)
    for batch, (x0, y0, h0) in zip(m._executor.ring, ring):
        assert batch.inputs[0] is x0 and batch.y is y0
        torch.testing.assert_close(batch.h, h0, rtol=0, atol=0)


@pytest.mark.parametrize("correction", ["parareal", "jacobi"])
def test_tree_mode_inputs_are_the_executors_estimates(correction: str) -> None:
    """The report's tree-mode inputs are what a training step's estimate and corrections compute."""
    m = _compiled("resmlp", 8, inputs="tree", correction=correction)
    x, y = _batch(m, "resmlp")
    m.training_step(*x, target=y)  # fills .grad only: the weights are those the report sees
    with torch.no_grad():
        ours = _tree_estimate(m, x[0], m.environment(*x), "couplers")
    theirs = [x[0]] + [m._executor.read(Value.h(i, sweep=m.config.corrections)) for i in range(1, 8)]
    torch.testing.assert_close(ours, theirs)

    tree = m.gradient_report(*x, target=y)
    assert tree.inputs.startswith("tree estimate, K=2")
    wave = _shared("resmlp", 8, inputs="wavefront").gradient_report(*x, target=y)
    assert tree.blocks[0].cosine == pytest.approx(wave.blocks[0].cosine, abs=1e-9)  # block 1 reads x in both
    assert any(abs(a.cosine - b.cosine) > 1e-4 for a, b in zip(tree.blocks, wave.blocks))


def test_dgl_measures_head_gradients() -> None:
    m = _compiled("mlp", 4, objective="dgl")
    x, y = _batch(m, "mlp")
    report = m.gradient_report(*x, target=y)
    assert all(b.path == () for b in report.blocks)
    assert report.blocks[-1].cosine == pytest.approx(1.0, abs=1e-6)  # block N: the task loss itself
    assert report.blocks[0].cosine < 0.999  # a local head is not the network above it


def test_report_renders_and_serialises() -> None:
    m = _shared("mlp", 4, inputs="wavefront")
    x, y = _batch(m, "mlp")
    report = m.gradient_report(*x, target=y)
    text = report.table()
    assert "cosine" in text and "consistency error" in text and str(report) == text
    assert f"{report.blocks[0].cosine:.4f}" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["mean_cosine"] == pytest.approx(report.mean_cosine)
    assert [b["cosine"] for b in data["blocks"]] == [b.cosine for b in report.blocks]


def test_bad_arguments_raise_training_errors() -> None:
    m = _compiled("mlp", 2)
    x, y = _batch(m, "mlp")
    with pytest.raises(TrainingError, match="paths") as err:
        m.gradient_report(*x, target=y, paths="oracle")
    assert err.value.node == "paths" and err.value.remedy
    with pytest.raises(TrainingError, match="inputs"):
        m.gradient_report(*x, x[0], target=y)
    with pytest.raises(TrainingError, match="probes"):
        m.gradient_report(*x, target=y, probes=0)
    with pytest.raises(TrainingError, match="task loss failed") as err:
        m.gradient_report(*x, target=y[:3])
    assert err.value.node == "target" and isinstance(err.value.__cause__, ValueError)
    with torch.no_grad():
        next(m.blocks[0].parameters()).fill_(float("nan"))
    with pytest.raises(TrainingError, match="not finite"):
        m.gradient_report(*x, target=y)
    no_loss = hc.hbll_compile(ZOO["mlp"].build(), ZOO["mlp"].example(2), blocks=2)
    with pytest.raises(TrainingError, match="loss"):
        no_loss.gradient_report(*x, target=y)


def test_fit_records_reports_on_a_fixed_batch(tmp_path) -> None:
    m = _compiled("mlp", 4)
    data = TensorDataset(torch.randn(48, 20), torch.randint(0, 5, (48,)))
    fixed = (torch.randn(16, 20), torch.randint(0, 5, (16,)))
    before = m.gradient_report(fixed[0], target=fixed[1]).summary()
    history = m.fit(DataLoader(data, batch_size=8), epochs=2, progress=False, diagnose_every=4, diagnose_batch=fixed)
    rows = history["gradient_report"]
    assert [r["step"] for r in rows] == [0, 4, 8, 12]  # 6 steps per epoch
    assert rows[0] == {"step": 0, **before}
    assert all(len(r["block_cosine"]) == 4 and len(r["coupler_error"]) == 3 for r in rows)
    assert rows[-1]["block_cosine"] != rows[0]["block_cosine"]  # training moved the weights
    path = tmp_path / "history.png"
    plot_history(history, str(path))
    assert path.stat().st_size > 10_000
    with pytest.raises(TrainingError, match="diagnose_every"):
        m.fit(DataLoader(data, batch_size=8), epochs=1, progress=False, diagnose_every=0)
    with pytest.raises(TrainingError, match="no gradient reports"):
        plot_history({"loss": [1.0]}, str(path))


def test_fit_without_diagnose_batch_uses_the_first_batch() -> None:
    m = _compiled("mlp", 2)
    x, y = torch.randn(24, 20), torch.randint(0, 5, (24,))
    before = m.gradient_report(x[:8], target=y[:8]).summary()
    history = m.fit(DataLoader(TensorDataset(x, y), batch_size=8), epochs=1, progress=False, diagnose_every=10)
    assert history["gradient_report"] == [{"step": 0, **before}]


def test_plot_report_writes_a_png(tmp_path) -> None:
    m = _shared("mlp", 4, inputs="wavefront")
    x, y = _batch(m, "mlp")
    path = tmp_path / "cos.png"
    plot_report(m.gradient_report(*x, target=y), str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


_FACTORY = """
import torch

def build():
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
"""


@pytest.mark.parametrize("paths", ["couplers", "exact"])
def test_cli_diagnose_prints_the_table(tmp_path, capsys, paths: str) -> None:
    factory = tmp_path / "net.py"
    factory.write_text(_FACTORY)
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    argv = ["diagnose", f"{factory}:build", "--input-shape", "8,6", "--blocks", "4", "--train-steps", "2",
            "--paths", paths, "--json", str(out_json), "--png", str(out_png), "--head-weight", "0"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "gradient fidelity" in printed and "norm ratio" in printed and "VJP cosine" in printed
    data = json.loads(out_json.read_text())
    assert len(data["blocks"]) == 4 and len(data["couplers"]) == 3
    assert out_png.stat().st_size > 0
    if paths == "exact":
        assert all(b["cosine"] == pytest.approx(1.0, abs=1e-5) for b in data["blocks"])
    assert main(argv) == 0  # seeded: a second run prints the same report
    assert capsys.readouterr().out == printed


def test_cli_diagnose_mse(tmp_path, capsys) -> None:
    factory = tmp_path / "net.py"
    factory.write_text(_FACTORY)
    assert main(["diagnose", f"{factory}:build", "--input-shape", "8,6", "--blocks", "2", "--loss", "mse",
                 "--inputs", "tree"]) == 0
    assert "inputs tree estimate" in capsys.readouterr().out
