"""The error contract at compile time (issue 14, "never silently wrong").

Compiling either returns a model that equals the original, or raises a CompileError subclass that names
the node, the reason and a remedy; the compiled model refuses inputs outside the shape guards of its
capture; compiling never changes the caller's tensors or buffers; the CLI answers every bad argument
with exit status 2 and one line. The fuzz tests draw bad arguments with hypothesis; run them longer with
``HBLL_HYPOTHESIS_PROFILE=thorough`` (1000 examples each).
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import ZOO, fuzz
from hypothesis import event, given
from hypothesis import strategies as st
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

import hbll_compile as hc
from hbll_compile.cli import main


class BatchBranch(nn.Module):
    """Takes a Python branch on the batch size: torch.export records the guard ``x.size()[0] <= 4``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if x.shape[0] > 4:
            h = h * 2
        return self.b(h)


class RowIndex(nn.Module):
    """Adds each row's index: right at any batch size only if the batch dimension stays dynamic."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x) + torch.arange(x.shape[0]).unsqueeze(1))


class Counter(nn.Module):
    """Counts its calls in a buffer and doubles its input in place."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        x.mul_(2)
        return self.b(torch.relu(self.a(x)))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


class TokenModel(nn.Module):
    """Rank-1 inputs that are a batch: one token id per row."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.a, self.b = nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(self.emb(ids))))


# -- shape guards ------------------------------------------------------------------------------------
def test_batch_branch_guard_refuses_a_batch_outside_it() -> None:
    torch.manual_seed(0)
    net = BatchBranch().eval()
    m = hc.hbll_compile(net, (torch.randn(4, 8),), blocks=2).eval()
    with pytest.raises(hc.GuardError) as info:
        m(torch.randn(6, 8))
    err = info.value
    assert err.node == "input x"
    assert "batch dimension of input x must be <= 4" in err.reason and "(6, 8)" in err.reason
    assert "recompile with an example" in err.remedy
    x3 = torch.randn(3, 8)  # inside the guard: the compiled model still equals the model
    torch.testing.assert_close(m(x3), net(x3), rtol=0, atol=1e-6)


def test_fixed_feature_size_is_a_guard() -> None:
    m = hc.hbll_compile(mlp(), (torch.randn(4, 8),), blocks=2)
    with pytest.raises(hc.GuardError, match="dim 1 of input input must be 8"):
        m(torch.randn(4, 9))


def test_guard_checked_in_training_step() -> None:
    m = hc.hbll_compile(BatchBranch(), (torch.randn(4, 8),), blocks=2, loss=nn.functional.mse_loss)
    with pytest.raises(hc.GuardError):
        m.training_step(torch.randn(6, 8), target=torch.randn(6, 8))


def test_batch_size_dependent_values_stay_dynamic() -> None:
    net = RowIndex().eval()
    m = hc.hbll_compile(net, (torch.randn(4, 8),), blocks=2).eval()
    x6 = torch.randn(6, 8)
    torch.testing.assert_close(m(x6), net(x6), rtol=0, atol=1e-5)


@pytest.mark.parametrize("example, what", [
    (torch.randn(1, 8), "a batch of 1 rows"),
    (torch.randn(0, 8), "a batch of 0 rows"),
    (torch.tensor(1.0), "no batch dimension"),
])
def test_examples_without_a_dynamic_batch_are_refused(example: torch.Tensor, what: str) -> None:
    with pytest.raises(hc.CaptureError, match=what) as info:
        hc.hbll_compile(RowIndex(), (example,), blocks=2)
    assert "at least 2 rows" in info.value.remedy


def test_unbatched_sample_is_refused() -> None:
    """A rank-1 example for a first nn.Linear is one sample: the model fixes its dim 0 to 8."""
    with pytest.raises(hc.CaptureError, match="fixes dim 0 of input input to 8") as info:
        hc.hbll_compile(mlp(), (torch.randn(8),), blocks=2)
    assert "leading batch dimension" in info.value.remedy


def test_rank_one_batch_of_token_ids_is_accepted() -> None:
    net = TokenModel().eval()
    m = hc.hbll_compile(net, (torch.randint(0, 10, (4,)),), blocks=2).eval()
    ids = torch.randint(0, 10, (7,))
    torch.testing.assert_close(m(ids), net(ids), rtol=0, atol=1e-6)


def test_verify_runs_a_second_batch_size_inside_the_guards() -> None:
    seen: list[int] = []

    def record(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]
        if not isinstance(x, FakeTensor) and isinstance(x.shape[0], int):
            seen.append(x.shape[0])

    net = BatchBranch()
    net.register_forward_pre_hook(record)
    hc.hbll_compile(net, (torch.randn(4, 8),), blocks=2)
    assert 4 in seen and 3 in seen  # 5 breaks the guard x.size()[0] <= 4, so the second batch has 3 rows


# -- compile leaves the caller's state alone ---------------------------------------------------------
def test_compile_mutates_neither_buffers_nor_example_inputs() -> None:
    net, x = Counter(), torch.ones(4, 8)
    hc.hbll_compile(net, (x,), blocks=2)
    assert net.calls.item() == 0
    torch.testing.assert_close(x, torch.ones(4, 8), rtol=0, atol=0)


def test_compile_leaves_batchnorm_statistics_alone() -> None:
    case = ZOO["cnn_bn"]
    torch.manual_seed(0)
    net = case.build()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    hc.hbll_compile(net, case.example(4), blocks=2)
    for name, value in net.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)


def test_compiled_model_still_shares_the_restored_buffers() -> None:
    net = Counter()
    m = hc.hbll_compile(net, (torch.ones(4, 8),), blocks=2)
    m(torch.ones(4, 8))
    assert net.calls.item() == 1


# -- bad arguments -----------------------------------------------------------------------------------
@pytest.mark.parametrize("blocks", [2.5, True, False, "2", 2.0, [2]])
def test_blocks_of_the_wrong_type_are_refused(blocks: Any) -> None:
    with pytest.raises(hc.CompileError) as info:
        hc.hbll_compile(mlp(), (torch.randn(4, 8),), blocks=blocks)
    assert info.value.node == "blocks" and "int" in info.value.remedy


@pytest.mark.parametrize("example, expected", [
    (torch.randn(4, 7), "(input: (4, 7) float32): RuntimeError: mat1 and mat2 shapes cannot be multiplied"),
    (torch.randint(0, 3, (4, 8)), "(input: (4, 8) int64): RuntimeError: mat1 and mat2 must have the same dtype"),
])
def test_wrong_example_shape_or_dtype_names_input_and_module(
    example: torch.Tensor, expected: str, capfd: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(hc.CaptureError) as info:
        hc.hbll_compile(mlp(), (example,), blocks=2)
    err = info.value
    assert expected in err.reason
    assert err.node == "module '0' (Linear)"
    assert isinstance(err.__cause__, RuntimeError)
    assert capfd.readouterr().err == ""  # no FakeTensor tracebacks logged


def test_failed_export_prints_nothing_and_restores_log_levels(capfd: pytest.CaptureFixture[str]) -> None:
    class MaskIndex(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            return h[h > 0] * 2

    levels = {name: logging.getLogger(name).level for name in ("torch", "torch._subclasses.fake_tensor")}
    with pytest.raises(hc.CaptureError, match="does not follow from the input shapes") as info:
        hc.hbll_compile(MaskIndex(), (torch.randn(3, 4),), blocks=1)
    assert "h[h > 0]" in info.value.node or "test_contract.py" in info.value.node
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
    assert {name: logging.getLogger(name).level for name in levels} == levels


# -- command line ------------------------------------------------------------------------------------
FACTORY = '''
import torch
def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
def broken():
    raise ValueError("no model today")
'''


@pytest.fixture(scope="module")
def factory_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "factories.py"
    path.write_text(FACTORY)
    return path


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def assert_one_line_error(rc: int, err: str, expected: str) -> None:
    lines = err.splitlines()
    assert rc == 2
    assert lines[0].startswith("hbll: ") and expected in lines[0], err
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("  remedy: ")), err


@pytest.mark.parametrize("argv, expected", [
    (["--input-shape", "0,8"], "CaptureError: at input 0: example input 0 (shape (0, 8)) is a batch of 0 rows"),
    (["--input-shape", "4x8"], "error: argument --input-shape: expected comma-separated sizes"),
    (["--input-shape", "4,8", "--dtype", "float99"], "error: argument --dtype: unknown dtype 'float99'"),
    (["--input-shape", "4,8", "--blocks", "2.5"], "error: argument --blocks: invalid int value: '2.5'"),
    (["--input-shape", "4,7"], "CaptureError: at module '0' (Linear): the model fails on its example inputs"),
    (["--input-shape", "4,8", "--blocks", "0"], "CutError: at blocks: blocks must be at least 1"),
])
def test_cli_bad_arguments_give_one_line_and_rc_2(factory_file: Path, argv: list[str], expected: str) -> None:
    rc, _, err = run_cli("inspect", f"{factory_file}:mlp", *argv)
    assert_one_line_error(rc, err, expected)
    assert "Traceback" not in err


@pytest.mark.parametrize("spec, expected", [
    ("{dir}/missing.py:mlp", "no such file"),
    ("{file}", "expected FILE.py:FACTORY"),
    ("{file}:nothing", "defines no callable 'nothing'"),
    ("{file}:broken", "raised ValueError: no model today"),
])
def test_cli_wrong_factory_gives_one_line_and_rc_2(factory_file: Path, spec: str, expected: str) -> None:
    spec = spec.format(dir=factory_file.parent, file=factory_file)
    rc, _, err = run_cli("inspect", spec, "--input-shape", "4,8")
    assert_one_line_error(rc, err, expected)


def test_cli_debug_prints_the_traceback(factory_file: Path) -> None:
    rc, _, err = run_cli("--debug", "inspect", f"{factory_file}:mlp", "--input-shape", "4,7")
    assert rc == 2 and "Traceback (most recent call last)" in err
    assert err.splitlines()[-2].startswith("hbll: CaptureError: ")


def test_cli_succeeds_on_a_good_model(factory_file: Path) -> None:
    rc, out, err = run_cli("inspect", f"{factory_file}:mlp", "--input-shape", "4,8", "--blocks", "2")
    assert rc == 0 and err == "" and "HBLL blocks: N=2" in out


# -- fuzzing -----------------------------------------------------------------------------------------
MODELS = {"mlp": (mlp, torch.float32, 8), "tokens": (TokenModel, torch.int64, None)}

not_tensors = st.one_of(st.none(), st.integers(), st.floats(allow_nan=False), st.text(max_size=3),
                        st.lists(st.integers(), max_size=2))
dtypes = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.bool,
                          torch.complex64])


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    shape = draw(st.lists(st.integers(0, 9), min_size=0, max_size=3))
    dtype = draw(dtypes)
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, dtype=dtype)
    return torch.randint(0, 10, shape).to(dtype)


@st.composite
def near_inputs(draw: st.DrawFn, model: str) -> tuple[torch.Tensor, ...]:
    """The model's kind of input, or one perturbed: rows, feature size, rank or dtype."""
    _, dtype, features = MODELS[model]
    shape = [draw(st.integers(0, 6))] + ([] if features is None else [features])
    perturb = draw(st.sampled_from(["none", "none", "size", "rank", "dtype", "two"]))
    if perturb == "size" and features is not None:
        shape[-1] = draw(st.integers(0, 12))
    elif perturb == "rank":
        shape = draw(st.sampled_from([shape[1:], shape + [draw(st.integers(1, 3))], [shape[0], 1, *shape[1:]]]))
    dtype = draw(dtypes) if perturb == "dtype" else dtype
    x = torch.randn(shape).to(dtype) if features is not None else torch.randint(0, 10, shape).to(dtype)
    return (x, x.clone()) if perturb == "two" else (x,)


@st.composite
def compile_arguments(draw: st.DrawFn) -> tuple[str, Any, Any]:
    model = draw(st.sampled_from(sorted(MODELS)))
    kind = draw(st.sampled_from(["near", "near", "near", "tensor", "not a tensor", "tuple"]))
    examples = draw({"near": near_inputs(model), "tensor": tensors(), "not a tensor": not_tensors,
                     "tuple": st.lists(st.one_of(tensors(), not_tensors), max_size=2).map(tuple)}[kind])
    kind = draw(st.sampled_from(["none", "int", "int", "wrong type"]))
    blocks = {"none": st.none(), "int": st.integers(-1, 5),
              "wrong type": st.one_of(st.booleans(), st.floats(0, 4), st.text(max_size=2))}[kind]
    return model, examples, draw(blocks)


@fuzz
@given(compile_arguments())
def test_fuzz_compile_succeeds_exactly_or_raises_a_project_error(arguments: tuple[str, Any, Any]) -> None:
    model, examples, blocks = arguments
    net = MODELS[model][0]().eval()
    try:
        m = hc.hbll_compile(net, examples, blocks=blocks)
    except hc.CompileError as err:
        assert err.reason and err.remedy
        event(f"refused: {type(err).__name__} at {str(err.node).split(':')[0]}")
        return
    event("compiled")
    m.eval()
    inputs = (examples,) if isinstance(examples, torch.Tensor) else tuple(examples)
    second = m.guards.resized(inputs, inputs[0].shape[0] + 3)
    with torch.no_grad():
        for batch in (inputs, second):
            torch.testing.assert_close(m(*batch), net(*batch), rtol=0, atol=1e-5)


shape_texts = st.one_of(
    st.integers(0, 6).map(lambda rows: f"{rows},8"),
    st.lists(st.integers(0, 9), min_size=1, max_size=3).map(lambda s: ",".join(map(str, s))),
    st.text(alphabet="0123456789,x- .", max_size=6),
)
dtype_texts = st.sampled_from(["float32", "float64", "int64", "bool", "float99", "qint8", "Tensor", "", "1"])
block_texts = st.one_of(st.integers(-1, 4).map(str), st.sampled_from(["2.5", "x", ""]))


@fuzz
@given(shape_texts, st.none() | dtype_texts, st.none() | block_texts)
def test_fuzz_cli_succeeds_or_fails_with_rc_2_and_one_line(
    factory_file: Path, shape: str, dtype: str | None, blocks: str | None
) -> None:
    argv = ["inspect", f"{factory_file}:mlp", f"--input-shape={shape}"]
    argv += [f"--dtype={dtype}"] if dtype is not None else []
    argv += [f"--blocks={blocks}"] if blocks is not None else []
    rc, out, err = run_cli(*argv)
    event(f"rc {rc}")
    if rc == 0:
        assert err == "" and "HBLL blocks" in out
    else:
        assert_one_line_error(rc, err, "")
