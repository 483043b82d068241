"""Never silently wrong at training time: the non-finite guard, argument checks, exact resume, and
save files that refuse corruption (issue 14)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import ZOO, compile_case, fuzz, targets
from hypothesis import given
from hypothesis import strategies as st
from torch.testing import assert_close
from torch.utils.data import DataLoader, TensorDataset

import hbll_compile as hc

MODES = [("wavefront", "loop"), ("wavefront", "batched"), ("tree", "loop"), ("tree", "batched")]


def _batches(n: int, batch: int = 8, seed: int = 0) -> list[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
    torch.manual_seed(seed)
    return [(ZOO["resmlp"].example(batch, seed=seed + k), targets("resmlp", batch)) for k in range(n)]


def _snapshot(m: hc.HBLLModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def _train(m: hc.HBLLModel, opt: torch.optim.Optimizer, batches) -> list[float]:
    losses = []
    for x, y in batches:
        opt.zero_grad()
        losses.append(float(m.training_step(*x, target=y)))
        opt.step()
    return losses


# -- the non-finite guard ------------------------------------------------------------------------
@pytest.mark.parametrize(("inputs", "executor"), MODES)
def test_a_nan_batch_raises_and_leaves_no_trace(inputs: str, executor: str) -> None:
    heads = {"local_head_weight": None}  # a fused head: the error names the block with it
    m = compile_case("resmlp", 4, inputs=inputs, executor=executor, **heads)
    ref = compile_case("resmlp", 4, inputs=inputs, executor=executor, **heads)
    opt, ref_opt = (torch.optim.SGD(k.parameters(), lr=0.1) for k in (m, ref))
    good = _batches(6)
    _train(m, opt, good[:3])
    _train(ref, ref_opt, good[:3])
    (x,), y = good[3]
    bad = x.clone()
    bad[2, 5] = float("nan")
    before = _snapshot(m)
    opt.zero_grad()
    with pytest.raises(hc.NonFiniteError) as info:
        m.training_step(bad, target=y)
    assert info.value.node == "block 1 (with head 1)"
    assert "its input" in info.value.reason and "step 3" in info.value.reason
    assert all(p.grad is None for p in m.parameters())  # no gradient of that step is left to apply
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k  # weights, statistics and the pipeline are as before
    # the run goes on as if the bad batch never came
    assert _train(m, opt, good[3:]) == _train(ref, ref_opt, good[3:])
    for p, q in zip(m.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_fit_raises_on_divergence_or_skips_and_never_reports_zero() -> None:
    data = TensorDataset(torch.randn(64, 20), torch.randint(0, 5, (64,)))
    m = compile_case("resmlp", 4)
    with pytest.raises(hc.NonFiniteError, match="non-finite"):
        m.fit(DataLoader(data, batch_size=8), 3, torch.optim.SGD(m.parameters(), lr=1e12), progress=False)
    x = data.tensors[0].clone()
    x[8:16] = float("inf")  # the second batch is bad
    m = compile_case("resmlp", 4)
    history = m.fit(DataLoader(TensorDataset(x, data.tensors[1]), batch_size=8), 2,
                    torch.optim.SGD(m.parameters(), lr=0.01), progress=False, on_nonfinite="skip")
    assert history["skipped"] == [1, 1]
    assert all(torch.isfinite(torch.tensor(loss)) and loss > 0 for loss in history["loss"])
    all_bad = TensorDataset(torch.full((16, 20), float("nan")), data.tensors[1][:16])
    history = compile_case("resmlp", 4).fit(DataLoader(all_bad, batch_size=8), 1, progress=False,
                                            on_nonfinite="skip")
    assert history["skipped"] == [2] and torch.isnan(torch.tensor(history["loss"][0]))  # NaN, never 0.0


# -- argument checks -----------------------------------------------------------------------------
def test_bad_training_and_forward_arguments_get_project_errors() -> None:
    m = compile_case("resmlp", 4)
    (x,) = ZOO["resmlp"].example(4)
    y = targets("resmlp", 4)
    with pytest.raises(hc.TrainingError, match="target"):
        m.training_step(x, target=None)
    with pytest.raises(hc.TrainingError, match="rows"):
        m.training_step(x, target=y[:3])
    with pytest.raises(hc.TrainingError, match="task loss failed"):
        m.training_step(x, target=torch.rand(4, 7))
    with pytest.raises(hc.CompileError, match="depth"):
        m(x, depth=0.5)
    with pytest.raises(hc.CompileError, match="depth"):
        m(x, depth=-1)
    with pytest.raises(hc.CompileError, match="inputs"):
        m(x, x)
    with pytest.raises(hc.CompileError, match="not a tensor"):
        m([1.0, 2.0])
    for bad_loss, match in ((lambda out, t: 1.0, "float"), (lambda out, t: F.cross_entropy(out, t, reduction="none"),
                                                             "shape")):
        k = hc.hbll_compile(ZOO["resmlp"].build(), (x,), blocks=4, loss=bad_loss)
        with pytest.raises(hc.TrainingError, match=match):
            for _ in range(4):  # wavefront: block N runs from the 4th step on
                k.training_step(x, target=y)


# -- exact resume --------------------------------------------------------------------------------
@pytest.mark.parametrize(("inputs", "executor"), MODES)
def test_state_dict_resume_is_bit_exact(tmp_path: Path, inputs: str, executor: str) -> None:
    batches = _batches(10)
    full = compile_case("resmlp", 4, inputs=inputs, executor=executor)
    full_opt = torch.optim.AdamW(full.parameters(), lr=1e-3)
    expected = _train(full, full_opt, batches)

    first = compile_case("resmlp", 4, inputs=inputs, executor=executor)
    opt = torch.optim.AdamW(first.parameters(), lr=1e-3)
    got = _train(first, opt, batches[:5])
    torch.save({"model": first.state_dict(), "optim": opt.state_dict()}, tmp_path / "ckpt.pt")

    resumed = compile_case("resmlp", 4, inputs=inputs, executor=executor)
    saved = torch.load(tmp_path / "ckpt.pt")
    resumed.load_state_dict(saved["model"])
    opt = torch.optim.AdamW(resumed.parameters(), lr=1e-3)
    opt.load_state_dict(saved["optim"])
    got += _train(resumed, opt, batches[5:])
    assert got == expected or all(a == b or (a != a and b != b) for a, b in zip(got, expected))
    for p, q in zip(resumed.parameters(), full.parameters()):
        assert torch.equal(p, q)


def test_save_and_load_with_optimizer_resume_exactly(tmp_path: Path) -> None:
    batches = _batches(8)
    full = compile_case("resmlp", 4)
    full_opt = torch.optim.AdamW(full.parameters(), lr=1e-3)
    _train(full, full_opt, batches)
    first = compile_case("resmlp", 4)
    opt = torch.optim.AdamW(first.parameters(), lr=1e-3)
    _train(first, opt, batches[:3])
    path = tmp_path / "new" / "dir" / "m.safetensors"  # a missing directory is created
    first.save(path, optimizer=opt)
    loaded = hc.HBLLModel.load(path, ZOO["resmlp"].factory, loss=F.cross_entropy)
    opt = torch.optim.AdamW(loaded.parameters(), lr=1e-3)
    hc.HBLLModel.restore_optimizer(opt, path)
    _train(loaded, opt, batches[3:])
    for p, q in zip(loaded.parameters(), full.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize(("inputs", "executor"), MODES)
def test_fit_killed_mid_epoch_resumes_bit_exactly(tmp_path: Path, inputs: str, executor: str) -> None:
    data = TensorDataset(torch.randn(48, 20), torch.randint(0, 5, (48,)))

    def run(model: hc.HBLLModel, stop_after: int | None, resume: bool) -> dict:
        torch.manual_seed(7)
        loader = DataLoader(data, batch_size=8, shuffle=True)

        class Killed(Exception):
            pass

        def killing() -> object:
            for k, batch in enumerate(loader):
                if stop_after is not None and k == stop_after and not resume:
                    raise Killed
                yield batch

        class Loader:
            def __len__(self) -> int:
                return len(loader)

            def __iter__(self):
                return killing()

        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        try:
            return model.fit(Loader(), 3, opt, progress=False, checkpoint=tmp_path / "run.safetensors",
                             checkpoint_every=1, resume=resume)
        except Killed:
            return {}

    reference = compile_case("resmlp", 4, inputs=inputs, executor=executor)
    run(reference, None, resume=False)
    os.remove(tmp_path / "run.safetensors")
    interrupted = compile_case("resmlp", 4, inputs=inputs, executor=executor)
    assert run(interrupted, 4, resume=False) == {}  # killed in epoch 1, after 4 steps... then again:
    resumed = compile_case("resmlp", 4, inputs=inputs, executor=executor)
    torch.manual_seed(123)  # a fresh process has another RNG state; the checkpoint restores it
    run(resumed, None, resume=True)
    for p, q in zip(resumed.parameters(), reference.parameters()):
        assert torch.equal(p, q)


# -- save files ----------------------------------------------------------------------------------
def test_corrupt_truncated_and_foreign_files_are_refused(tmp_path: Path) -> None:
    m = compile_case("resmlp", 4)
    path = tmp_path / "m.safetensors"
    m.save(path)
    raw = bytearray(path.read_bytes())
    raw[-7] ^= 0x40  # a flipped bit in the last tensor's data
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(bytes(raw))
    with pytest.raises(hc.CompileError, match="checksum"):
        hc.HBLLModel.load(flipped, ZOO["resmlp"].factory)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: len(raw) // 2])
    with pytest.raises(hc.CompileError, match="truncated or corrupt"):
        hc.HBLLModel.load(truncated, ZOO["resmlp"].factory)
    with pytest.raises(hc.CompileError, match="no such file"):
        hc.HBLLModel.load(tmp_path / "absent.safetensors", ZOO["resmlp"].factory)
    with pytest.raises(hc.CompileError, match="does not fit") as info:
        hc.HBLLModel.load(path, lambda: ZOO["resmlp"].factory(width=16))
    assert "other shape" in info.value.reason
    with pytest.raises(hc.CompileError, match="callable"):
        hc.HBLLModel.load(path, "resmlp")
    with pytest.raises(hc.CompileError, match="no optimizer state"):
        hc.HBLLModel.restore_optimizer(torch.optim.SGD(m.parameters(), lr=0.1), path)
    loaded = hc.HBLLModel.load(path, ZOO["resmlp"].factory)
    x = ZOO["resmlp"].example(3)
    assert_close(loaded(*x), m(*x), rtol=0, atol=0)


# -- fuzzing: every outcome is exact success or a project error ---------------------------------
@functools.cache
def _fuzz_model() -> tuple[torch.nn.Module, hc.HBLLModel]:
    net = ZOO["resmlp"].build()
    return net, hc.hbll_compile(net, ZOO["resmlp"].example(4), blocks=4, loss=F.cross_entropy)


def _anything(draw: st.DrawFn) -> object:
    """A tensor of a random shape and dtype (sometimes holding NaN), or something that is no tensor."""
    kind = draw(st.sampled_from(["tensor", "none", "float", "list", "str"]))
    if kind != "tensor":
        return {"none": None, "float": 1.5, "list": [1.0, 2.0], "str": "x"}[kind]
    shape = tuple(draw(st.lists(st.integers(0, 25), min_size=0, max_size=3)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.int64, torch.bool]))
    t = torch.randn(shape).to(dtype) if dtype.is_floating_point else torch.randint(0, 5, shape).to(dtype)
    if dtype.is_floating_point and t.numel() and draw(st.booleans()):
        t.view(-1)[0] = float("nan")
    return t


@fuzz
@given(data=st.data())
def test_fuzz_runtime_succeeds_exactly_or_raises_a_project_error(data: st.DataObject, tmp_path_factory) -> None:
    net, m = _fuzz_model()
    good = ZOO["resmlp"].example(6, seed=3)
    action = data.draw(st.sampled_from(["forward", "training_step", "save_load"]))
    try:
        if action == "forward":
            inputs = (good[0] if data.draw(st.booleans()) else _anything(data.draw),)
            depth = data.draw(st.sampled_from([None, 0, 1, 2, 5, -1, 0.5, True, "1"]))
            with torch.no_grad():
                out = m(*inputs, depth=depth)
            if depth is None or depth == m.tree.depth:
                assert_close(out, net(*inputs), rtol=0, atol=1e-5)
        elif action == "training_step":
            x = good[0] if data.draw(st.booleans()) else _anything(data.draw)
            y = targets("resmlp", 6) if data.draw(st.booleans()) else _anything(data.draw)
            before = {k: v.clone() for k, v in m.state_dict().items() if not k.startswith("pipeline.")}
            try:
                loss = m.training_step(x, target=y)
            except hc.CompileError:
                for k, v in m.state_dict().items():  # a refused step changes nothing
                    if k in before:
                        assert torch.equal(v, before[k]), k
                assert all(p.grad is None or bool(p.grad.isfinite().all()) for p in m.parameters())
                raise
            assert isinstance(loss, torch.Tensor) and loss.dim() == 0
            m.zero_grad()
        else:
            folder = tmp_path_factory.mktemp("fuzz")
            name = data.draw(st.sampled_from(["m.safetensors", "new/dir/m.safetensors"]))
            m.save(folder / name)
            factory = data.draw(st.sampled_from([ZOO["resmlp"].factory, lambda: ZOO["resmlp"].factory(width=8),
                                                 lambda: None, "resmlp", ZOO["mlp"].factory]))
            path = data.draw(st.sampled_from([folder / name, folder / "missing.safetensors"]))
            loaded = hc.HBLLModel.load(path, factory, loss=F.cross_entropy)
            assert_close(loaded(*good), m(*good), rtol=0, atol=0)
    except hc.CompileError as err:
        assert err.reason and err.remedy, f"{type(err).__name__} without reason or remedy: {err}"
