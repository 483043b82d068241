"""ONNX export of compiled models (exact chain and depth-d) and per-unit onnxruntime-training artifacts.

The ORT-training tests need onnxruntime-training 1.19.2, which installs its own ``onnxruntime`` module and
so cannot live beside the ``onnxruntime`` these tests use. They run it in a subprocess with another
interpreter: the current one if it has ``onnxruntime.training``, else ``$HBLL_ORT_TRAINING_PYTHON``, else a
virtual environment cached at ``$HBLL_ORT_TRAINING_VENV`` (default
``~/.cache/hbll-compile/ort-training-1.19.2-pyXY``), created on first use with
``python -m venv --system-site-packages`` and ``pip install onnxruntime-training==1.19.2`` (it reuses this
environment's torch, onnx and hbll_compile). Set ``HBLL_NO_ORT_INSTALL=1`` to skip instead of installing.
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import ZOO, RecurrentLM, compile_case, seq_loss, targets

import hbll_compile as hc
from hbll_compile.cli import main
from hbll_compile.errors import ExportError
from hbll_compile.export.units import UnitObjective, chain_boundaries, training_units, unit_example
from hbll_compile.runtime.objectives import coupler_loss, head_loss, path_loss
from hbll_compile.runtime.schedule import Task

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4


def _blocks(name: str) -> int:
    return max(b for b in ZOO[name].blocks if b <= 4)


_COMPILED: dict[str, hc.HBLLModel] = {}


def compiled(name: str) -> hc.HBLLModel:
    """The zoo model ``name`` compiled at N=4 (or the largest N <= 4 it allows), built once per session."""
    if name not in _COMPILED:
        case = ZOO[name]
        _COMPILED[name] = hc.hbll_compile(case.build(), case.example(4), blocks=_blocks(name), loss=F.cross_entropy)
    return _COMPILED[name]


def _run_onnx(path: str, names: tuple[str, ...], inputs: tuple[torch.Tensor, ...]) -> np.ndarray:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {n: x.numpy() for n, x in zip(names, inputs)})[0]


def _torch_out(m: hc.HBLLModel, inputs: tuple[torch.Tensor, ...], depth: int | None) -> np.ndarray:
    was = m.training
    m.eval()
    try:
        with torch.no_grad():
            return m(*inputs, depth=depth).numpy()
    finally:
        m.train(was)


# -- inference export ---------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [None, 1])
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_export_matches_torch(name: str, depth: int | None, tmp_path: Path) -> None:
    m = compiled(name)
    assert m.training
    report = hc.export_onnx(m, tmp_path / f"{name}.onnx", depth=depth)
    assert m.training, "export must restore the train mode"
    assert report.exporter == "dynamo", report.fallback_reason
    assert report.max_abs_diff is not None and report.max_abs_diff <= TOL
    assert len(set(report.checked_batches)) == 2  # a second batch size ran: the batch axis is dynamic
    # an independent check on the zoo's own inputs (real token ids) at yet another batch size
    inputs = ZOO[name].example(5, seed=7)
    got = _run_onnx(report.path, report.input_names, inputs)
    assert np.abs(got - _torch_out(m, inputs, depth)).max() <= TOL
    graph = onnx.load(report.path).graph
    assert all(i.type.tensor_type.shape.dim[0].dim_param for i in graph.input)
    assert graph.output[0].type.tensor_type.shape.dim[0].dim_param


def test_language_model_over_time_exports(tmp_path: Path) -> None:
    """A model that emits every step's output, compiled over time, exports as the concatenation of its
    chunks' outputs."""
    torch.manual_seed(0)
    net = RecurrentLM("LSTM", 2)
    m = hc.hbll_compile(net, (torch.randint(0, 11, (4, 6)),), blocks=3, loss=seq_loss, over="time")
    report = hc.export_onnx(m, tmp_path / "lm.onnx")
    assert report.max_abs_diff is not None and report.max_abs_diff <= TOL
    ids = torch.randint(0, 11, (5, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = net(ids).numpy()
    assert np.abs(_run_onnx(report.path, report.input_names, (ids,)) - expected).max() <= TOL


def test_depth_zero_and_deepest(tmp_path: Path) -> None:
    m = compiled("resmlp")
    inputs = ZOO["resmlp"].example(3, seed=2)
    r0 = hc.export_onnx(m, tmp_path / "d0.onnx", depth=0, exporter="legacy")
    assert np.abs(_run_onnx(r0.path, r0.input_names, inputs) - _torch_out(m, inputs, 0)).max() <= TOL
    deepest = hc.export_onnx(m, tmp_path / "d2.onnx", depth=m.tree.depth, exporter="legacy")
    assert deepest.depth is None  # the deepest subnetwork is the exact chain


def test_legacy_exporter(tmp_path: Path) -> None:
    m = compiled("two_inputs")
    report = hc.export_onnx(m, tmp_path / "legacy.onnx", depth=1, exporter="legacy")
    assert report.exporter == "legacy" and report.opset == 17
    assert report.max_abs_diff <= TOL
    assert report.input_names == ("image", "extra")


def test_legacy_exporter_bakes_the_batch_of_attention_reshapes(tmp_path: Path) -> None:
    """Why the GPT needs the dynamo exporter: the TorchScript tracer records ``view(B, T, heads, -1)``
    with the example's B, which the dynamic-batch check catches."""
    with pytest.raises(ExportError) as info:
        hc.export_onnx(compiled("gpt"), tmp_path / "gpt.onnx", exporter="legacy")
    assert info.value.node == "batch" and "dynamic_batch=False" in info.value.remedy
    report = hc.export_onnx(compiled("gpt"), tmp_path / "gpt.onnx", exporter="legacy", dynamic_batch=False)
    assert report.checked_batches == (4,)


def test_auto_falls_back_to_legacy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = torch.onnx.export

    def no_dynamo(*args, **kwargs):
        if kwargs.get("dynamo", True):
            raise RuntimeError("simulated: torch.export cannot trace this model")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", no_dynamo)
    report = hc.export_onnx(compiled("mlp"), tmp_path / "m.onnx", depth=1)
    assert report.exporter == "legacy"
    assert "simulated" in report.fallback_reason
    assert report.max_abs_diff <= TOL


def test_mismatch_raises_export_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = ort.InferenceSession.run

    def corrupted(self, output_names, feed, *args, **kwargs):
        return [out + 1e-3 for out in real(self, output_names, feed, *args, **kwargs)]

    monkeypatch.setattr(ort.InferenceSession, "run", corrupted)
    with pytest.raises(ExportError) as info:
        hc.export_onnx(compiled("mlp"), tmp_path / "m.onnx", exporter="legacy")
    assert "differs from torch" in info.value.reason and info.value.remedy
    assert info.value.node.startswith("output 0")
    # without verification the file is written all the same
    report = hc.export_onnx(compiled("mlp"), tmp_path / "m.onnx", exporter="legacy", verify=False)
    assert report.max_abs_diff is None and Path(report.path).is_file()


def test_static_batch_and_explicit_inputs(tmp_path: Path) -> None:
    m = compiled("masked")
    inputs = ZOO["masked"].example(3, seed=4)
    report = hc.export_onnx(m, tmp_path / "s.onnx", dynamic_batch=False, example_inputs=inputs, exporter="legacy")
    assert report.checked_batches == (3,)
    assert onnx.load(report.path).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 3


def test_bad_requests_raise_export_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = compiled("mlp")
    with pytest.raises(ExportError, match="outside"):
        hc.export_onnx(m, tmp_path / "m.onnx", depth=5)
    with pytest.raises(ExportError, match="unknown exporter"):
        hc.export_onnx(m, tmp_path / "m.onnx", exporter="tvm")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.raises(ExportError) as info:
        hc.export_onnx(m, tmp_path / "m.onnx")
    assert "hbll-compile[onnx]" in info.value.remedy


def test_cli_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    factory = tmp_path / "factory.py"
    factory.write_text(textwrap.dedent("""
        import torch

        def build():
            torch.manual_seed(0)
            layers = [torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
                      torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)]
            return torch.nn.Sequential(*layers)
    """))
    out = tmp_path / "model_d1.onnx"
    code = main(["export", f"{factory}:build", "--input-shape", "4,6", "--blocks", "4", "--depth", "1", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "depth-1 subnetwork of 4 blocks" in printed and "max abs diff" in printed
    assert out.is_file()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.run(None, {session.get_inputs()[0].name: np.zeros((9, 6), np.float32)})[0].shape == (9, 3)
    code = main(["export", f"{factory}:build", "--input-shape", "4,6", "--blocks", "4", "--depth", "9", "-o", str(out)])
    assert code == 2 and "ExportError" in capsys.readouterr().err


# -- training units (torch side, no onnxruntime-training needed) ------------------------------------
def test_training_units_follow_the_objectives() -> None:
    m = compiled("gpt")
    units = {u.name: u for u in training_units(m)}
    assert sorted(units) == ["block1", "block2", "block3", "block4", "coupler0", "coupler1", "coupler4"]
    assert units["block1"].input_names(m.input_names) == ["idx", "target"]
    assert units["block2"].input_names(m.input_names) == ["h", "idx", "target"]  # context is recomputed in-graph
    assert units["block2"].path == tuple(n.id for n in m.tree.path(2))
    m = compiled("resmlp")
    x = ZOO["resmlp"].example(5, seed=3)
    y = torch.randint(0, 5, (5,))
    hs = chain_boundaries(m, x)
    env = m.environment(*x)
    for unit in training_units(m):
        args = unit_example(m, unit, x, y, hs)
        if unit.kind == "block":
            out = m.run_block(unit.index, args[0], env)
            expected = path_loss(m, unit.path, out, y, env)
            if str(unit.index) in m.heads:  # the default local head joins the block's objective
                expected = expected + m.config.head_weight * head_loss(m, unit.index, out, y)
        else:
            expected = coupler_loss(m, unit.index, (), args[0], args[1], y, env)
        torch.testing.assert_close(UnitObjective(m, unit)(*args), expected)


@pytest.mark.parametrize("config", [{}, {"local_head_weight": 0.5}, {"objective": "dgl"}, {"inputs": "tree"},
                                    {"coupler_copies": 1}], ids=["hbll", "hbll+heads", "dgl", "tree", "copies"])
def test_executor_and_export_train_every_unit_alike(config: dict) -> None:
    """For every unit kind (block, block with its head, the last block, coupler, DGL head update), the
    gradient the executor gives the unit equals the gradient of the exported objective on the same
    inputs: the local losses are written once."""
    m = compile_case("resmlp", 4, **config)
    units = {u.task: u for u in training_units(m)}
    expected: dict[Task, list[torch.Tensor]] = {}
    checked: list[str] = []

    def hook(task: Task, done: bool) -> None:
        unit = units.get(task)
        if unit is None:
            return
        if not done:
            values = [m._executor.read(v) for v in task.reads]
            if any(v is None for v in values):
                return  # wavefront warm-up: the executor skips this task
            if unit.kind == "coupler":
                h_a, h_t, y = values
                target = h_t if m.config.inputs == "wavefront" else m.run_node(m.tree.nodes[task.unit.id].children[1],
                                                                                h_t, {})
                args = (h_a, target.detach(), y) if unit.needs_y else (h_a, target.detach())
            else:
                args = tuple(values)
            params = [p for p in dict.fromkeys(unit.trainable)]
            for p in params:
                p.grad = None
            loss = UnitObjective(m, unit)(*(a.detach() for a in args))
            expected[task] = list(torch.autograd.grad(loss, params, allow_unused=True))
        elif task in expected:
            params = [p for p in dict.fromkeys(unit.trainable)]
            for p, g in zip(params, expected.pop(task)):
                torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
            checked.append(unit.name)

    m.register_task_hook(hook)
    for step in range(6):
        m.training_step(*ZOO["resmlp"].example(8, seed=step), target=targets("resmlp", 8))
    assert set(checked) == set(u.name for u in units.values())


class _Bessel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.special.bessel_j0(self.a(x)))


def test_an_unsupported_op_is_named_in_one_clean_message(tmp_path: Path) -> None:
    m = hc.hbll_compile(_Bessel(), (torch.randn(4, 8),), blocks=2)
    with pytest.raises(ExportError) as info:
        hc.export_onnx(m, tmp_path / "m.onnx")
    err = info.value
    assert "bessel_j0" in err.node and "cannot convert" in err.reason and "bessel_j0" in err.remedy
    assert "\x1b[" not in str(err) and "dynamic" not in err.remedy
    assert "Next steps" not in str(err)


def test_training_artifacts_need_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime.training", None)
    with pytest.raises(ExportError) as info:
        hc.export_training_artifacts(compiled("mlp"), tmp_path)
    assert "hbll-compile[ort-training]" in info.value.remedy
    with pytest.raises(ExportError, match="ort-training"):
        hc.ort.BlockTrainer(tmp_path)
    bp = hc.hbll_compile(ZOO["mlp"].build(), ZOO["mlp"].example(4), blocks=2, loss=F.cross_entropy,
                         config=hc.HBLLConfig(objective="bp"))
    with pytest.raises(ExportError, match="no local objectives"):
        training_units(bp)


# -- onnxruntime-training, in its own interpreter -------------------------------------------------
_PROBE = "import onnxruntime.training.api, onnxruntime.training.artifacts, torch, onnxscript"


def _works(python: str) -> bool:
    try:
        done = subprocess.run([python, "-c", _PROBE], capture_output=True, timeout=120, env=_env())
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [REPO, REPO / "tests", REPO / "examples"]
    env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), env.get("PYTHONPATH", "")])
    return env


def _venv() -> Path:
    tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hbll-compile"
    return Path(os.environ.get("HBLL_ORT_TRAINING_VENV") or cache / f"ort-training-1.19.2-{tag}")


_READY: dict[str, str | None] = {}


def _ready_python() -> str | None:
    """An interpreter that already has onnxruntime-training (nothing is installed here)."""
    if "python" not in _READY:
        _READY["python"] = None
        for python in (sys.executable, os.environ.get("HBLL_ORT_TRAINING_PYTHON"), str(_venv() / "bin" / "python")):
            if python and Path(python).exists() and _works(python):
                _READY["python"] = python
                break
    return _READY["python"]


@pytest.fixture(scope="session")
def ort_training_python() -> str:
    """An interpreter with onnxruntime-training 1.19.2, torch and this checkout.

    Built once under ~/.cache/hbll-compile (or ``HBLL_ORT_TRAINING_VENV``): a venv of its own, because
    onnxruntime-training replaces the ``onnxruntime`` module, that reaches this interpreter's packages
    (torch, onnx, onnxscript) through a ``.pth`` file placed after its own site-packages, so it works
    when the project itself lives in a venv. A failed setup fails the tests. They are skipped only when
    ``HBLL_NO_ORT_INSTALL`` is set and no such interpreter exists, or on Python >= 3.12, for which
    onnxruntime-training (its last release) has no wheels.
    """
    python = _ready_python()
    if python:
        return python
    venv = _venv()
    if sys.version_info >= (3, 12):
        pytest.skip("onnxruntime-training 1.19.2 (its last release) has wheels for Python <= 3.11 only")
    if os.environ.get("HBLL_NO_ORT_INSTALL"):
        pytest.skip(f"onnxruntime-training is not installed and HBLL_NO_ORT_INSTALL is set (venv: {venv})")
    done = subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"could not create {venv}: {done.stderr[-2000:]}"
    python = str(venv / "bin" / "python")
    own = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    Path(own, "hbll_parent_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    done = subprocess.run([python, "-m", "pip", "install", "-q", "onnxruntime-training==1.19.2"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"pip could not install onnxruntime-training in {venv}: {done.stderr[-2000:]}"
    assert _works(python), f"onnxruntime-training is installed in {venv} but `{_PROBE}` fails there"
    _READY["python"] = python
    return python


def _start(python: str, root: Path) -> subprocess.Popen:
    """Export ORT_UNITS with onnxruntime-training in one process, then train them in a fresh one."""
    plan: dict[str, list[str]] = {}
    for name, unit in ORT_UNITS:
        plan.setdefault(name, []).append(unit)
    (root / "train.py").write_text(textwrap.dedent(_TRAIN.format(units=repr(ORT_UNITS))))
    script = textwrap.dedent(_EXPORT.format(plan=repr(plan)))
    return subprocess.Popen([python, "-c", script], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env())


def _finish(proc: subprocess.Popen) -> dict:
    try:
        out, err = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, err[-4000:]
    return json.loads(out.strip().splitlines()[-1])


# (zoo model, unit): LayerNorm/GELU blocks through a coupler path, the last block, a coupler, a BatchNorm
# block whose path runs frozen BatchNorm blocks, and a token model whose context is recomputed in-graph.
ORT_UNITS = [("resmlp", "block2"), ("resmlp", "block4"), ("resmlp", "coupler4"), ("resnet", "block2"),
             ("masked", "block3")]

_EXPORT = """
    import json, sys, torch, numpy as np
    import torch.nn.functional as F
    import hbll_compile as hc
    from hbll_compile.export.units import chain_boundaries, training_units, unit_example
    from helpers import ZOO, compile_case, targets
    plan = {plan}
    out = {{}}
    for name, units in plan.items():
        case = ZOO[name]
        m = hc.hbll_compile(case.build(), case.example(4), blocks=4, loss=F.cross_entropy)
        manifest = hc.export_training_artifacts(m, name, units=units)
        x = case.example(6, seed=5)
        y = torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(0))
        hs = chain_boundaries(m, x)
        for unit in training_units(m):
            if unit.name in units:
                args = unit_example(m, unit, x, y, hs)
                np.savez(f"{{name}}/{{unit.name}}/args.npz", *[a.numpy() for a in args])
        out[name] = {{u: manifest["units"][u]["input_names"] for u in units}}
    import subprocess
    done = subprocess.run([sys.executable, "train.py"], capture_output=True, text=True)  # a fresh process
    if done.returncode:
        sys.exit(done.stderr)
    print(json.dumps({{"exported": out, "trained": json.loads(done.stdout.strip().splitlines()[-1])}}))
"""

_TRAIN = """
    import json, numpy as np
    import hbll_compile as hc
    out = {{}}
    for name, unit in {units}:
        trainer = hc.ort.BlockTrainer(f"{{name}}/{{unit}}")
        with np.load(f"{{name}}/{{unit}}/args.npz") as f:
            args = [f[f"arr_{{i}}"] for i in range(len(f.files))]
        before = trainer.eval_loss(*args[:-1], target=args[-1])
        losses = [trainer.step(*args[:-1], target=args[-1]) for _ in range(8)]
        params = trainer.parameters()
        out[f"{{name}}/{{unit}}"] = {{"losses": losses, "eval_before": before, "lr": trainer.lr,
                                      "input_names": trainer.input_names,
                                      "params_after": {{k: v.tolist() for k, v in params.items()}}}}
        if trainer.steps == 8 and unit == "block2" and name == "resmlp":
            trainer.save_checkpoint(f"{{name}}/{{unit}}/trained_checkpoint")
            import torch, torch.nn.functional as F
            from helpers import ZOO, compile_case, targets
            m = hc.hbll_compile(ZOO[name].build(), ZOO[name].example(4), blocks=4, loss=F.cross_entropy)
            trainer.load_into(m)
            state = dict(m.named_parameters())
            out["loaded"] = all(np.array_equal(state[k].detach().numpy(), v) for k, v in params.items())
    print(json.dumps(out))
"""


_BACKGROUND: dict[str, object] = {}


@pytest.fixture(scope="module", autouse=True)
def _ort_in_background(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """Start the ORT-training processes when the module starts, if an interpreter is ready and an ORT test
    was selected, so that they overlap the export tests (two cores)."""
    wanted = any("ort_artifacts" in getattr(item, "fixturenames", ()) for item in request.session.items)
    if wanted and _ready_python():
        root = tmp_path_factory.mktemp("ort")
        _BACKGROUND.update(root=root, proc=_start(_ready_python(), root))
    yield
    proc = _BACKGROUND.pop("proc", None)
    if isinstance(proc, subprocess.Popen) and proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def ort_artifacts(ort_training_python: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Artifacts for ORT_UNITS, written by one process with onnxruntime-training, trained by another."""
    if "result" not in _BACKGROUND:
        proc = _BACKGROUND.get("proc")
        if not isinstance(proc, subprocess.Popen):
            _BACKGROUND["root"] = tmp_path_factory.mktemp("ort")
            proc = _start(ort_training_python, _BACKGROUND["root"])
        _BACKGROUND["result"] = _finish(proc)
    return _BACKGROUND["root"], _BACKGROUND["result"]


def _torch_reference(name: str, unit_name: str, args: list[np.ndarray], steps: int) -> tuple[list[float], dict]:
    """Losses of ``steps`` torch AdamW steps (lr 1e-3, torch defaults) on the unit's local objective,
    computed with the runtime's objectives, and the trained parameters."""
    case = ZOO[name]
    m = hc.hbll_compile(case.build(), case.example(4), blocks=4, loss=F.cross_entropy)
    m.train()
    unit = next(u for u in training_units(m) if u.name == unit_name)
    tensors = [torch.from_numpy(a) for a in args]
    y = tensors[-1]
    env = m.environment(*tensors[1:1 + len(m.input_names)]) if unit.needs_inputs and unit.boundary else {}
    params = list(dict.fromkeys(unit.trainable))
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        if unit.kind == "block":
            out = m.run_block(unit.index, tensors[0], env)
            loss = path_loss(m, unit.path, out, y, env)
            if str(unit.index) in m.heads:  # the default local head joins the block's objective
                loss = loss + m.config.head_weight * head_loss(m, unit.index, out, y)
        else:
            loss = coupler_loss(m, unit.index, (), tensors[0], tensors[1], y, env)
        torch.autograd.backward(loss, inputs=params)
        optimizer.step()
        losses.append(loss.item())
    return losses, dict(m.named_parameters(remove_duplicate=False))


@pytest.mark.parametrize(("name", "unit"), ORT_UNITS)
def test_ort_training_step_matches_torch(ort_artifacts: tuple[Path, dict], name: str, unit: str) -> None:
    root, results = ort_artifacts
    trained = results["trained"][f"{name}/{unit}"]
    with np.load(root / name / unit / "args.npz") as f:
        args = [f[f"arr_{i}"] for i in range(len(f.files))]
    reference, params = _torch_reference(name, unit, args, steps=2)
    ort_losses = trained["losses"]
    assert abs(ort_losses[0] - reference[0]) <= TOL, (ort_losses[:2], reference)  # the step's loss
    assert abs(ort_losses[1] - reference[1]) <= TOL, (ort_losses[:2], reference)  # after one update: same gradient
    assert trained["lr"] == pytest.approx(1e-3)


@pytest.mark.parametrize(("name", "unit"), ORT_UNITS)
def test_ort_training_lowers_the_loss(ort_artifacts: tuple[Path, dict], name: str, unit: str) -> None:
    losses = ort_artifacts[1]["trained"][f"{name}/{unit}"]["losses"]
    assert losses[-1] < losses[0], losses


def test_ort_artifacts_files_and_manifest(ort_artifacts: tuple[Path, dict]) -> None:
    root, results = ort_artifacts
    manifest = json.loads((root / "resmlp" / "manifest.json").read_text())
    assert manifest["ir_version"] <= 10 and manifest["optimizer"]["name"] == "AdamW"
    assert set(manifest["units"]) == {"block2", "block4", "coupler4"}
    for unit in manifest["units"]:
        directory = root / "resmlp" / unit
        for file in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint", "unit.json"):
            assert (directory / file).exists(), file
        for file in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx"):
            assert onnx.load(str(directory / file), load_external_data=False).ir_version <= 10
    block = manifest["units"]["block2"]
    assert block["input_names"] == ["h", "target"] and block["target"]["dtype"] == "int64"
    assert all(name.startswith(("blocks.1.", "heads.2.")) for name in block["trainable"].values())  # block 2, its head
    coupler = manifest["units"]["coupler4"]
    assert coupler["kind"] == "coupler" and coupler["target"]["role"] == "h_4"
    assert results["exported"]["masked"]["block3"] == ["h", "tokens", "target"]
    assert (root / "resmlp" / "block2" / "trained_checkpoint").exists()
    assert results["trained"]["loaded"] is True  # BlockTrainer.load_into wrote them into the torch model


def test_ort_training_follows_torch_adamw(ort_artifacts: tuple[Path, dict]) -> None:
    """Eight ORT steps follow eight torch AdamW steps: the same losses, and parameters (named as in
    HBLLModel) that agree to well within one step's size. AdamW divides by sqrt(v) + eps, so gradient
    entries near eps (~1e-8) amplify float rounding into up to ~lr per step; hence 1e-3, not 1e-4."""
    root, results = ort_artifacts
    trained = results["trained"]["resmlp/block2"]
    with np.load(root / "resmlp" / "block2" / "args.npz") as f:
        args = [f[f"arr_{i}"] for i in range(len(f.files))]
    losses, params = _torch_reference("resmlp", "block2", args, steps=8)
    assert np.abs(np.asarray(trained["losses"]) - losses).max() <= TOL
    initial = dict(compiled("resmlp").named_parameters(remove_duplicate=False))
    assert trained["params_after"]
    moved = 0.0
    for name, value in trained["params_after"].items():
        value = np.asarray(value)
        reference = params[name].detach().numpy()
        assert np.abs(value - reference).max() <= 1e-3, name
        assert np.abs(value - reference).mean() <= 1e-5, name
        moved = max(moved, np.abs(reference - initial[name].detach().numpy()).max())
    assert moved > 5e-3  # eight steps of lr 1e-3 moved them much further than the tolerance
