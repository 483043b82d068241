"""The examples and the command line run end to end (small settings)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import resources
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import write_cifar10

import hbll_compile as hc
from hbll_compile.cli import main as cli

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def _example(name: str, folder: Path = EXAMPLES):
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _clone(destination: Path) -> Path:
    """Copy the repository's files as a clone would have them (tracked or new, never ignored ones)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():  # skip tracked files deleted in the working tree
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, destination / name)
    return destination


def test_mnist_demo_runs_from_a_clone_without_shared(tmp_path: Path) -> None:
    clone = _clone(tmp_path / "clone")  # a fresh folder: no ../shared beside it
    env = {**os.environ, "PYTHONPATH": str(clone), "OMP_NUM_THREADS": "1"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, *args], cwd=clone, env=env, capture_output=True, text=True,
                              timeout=120)

    found = run("-c", "import importlib.util; print(importlib.util.find_spec('hbll_compile').origin)")
    assert Path(found.stdout.strip()) == clone / "hbll_compile" / "__init__.py"
    demo = run("examples/mnist_resmlp.py", "--epochs", "2", "--width", "32", "--depth", "4", "--blocks", "4",
               "--limit", "1536")
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "critical path" in demo.stdout and "depth 0" in demo.stdout
    accuracies = re.search(r"held-out accuracy: BP ([\d.]+)%, HBLL ([\d.]+)%", demo.stdout)
    assert accuracies is not None, demo.stdout[-2000:]
    bp, hbll = map(float, accuracies.groups())
    assert bp > 50 and hbll > 50  # 24 steps on real digits reach well above chance (10%)


def test_wheel_ships_mnist8k(tmp_path: Path) -> None:
    """pyproject.toml declares the package data, so an installed (non-editable) package has the demo data."""
    pytest.importorskip("setuptools", reason="builds the wheel offline with the project's build backend")
    clone = _clone(tmp_path / "clone")
    subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], cwd=clone, check=True, capture_output=True)
    (wheel,) = tmp_path.glob("hbll_compile-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert "hbll_compile/_data/README.md" in archive.namelist()
        shipped = archive.read("hbll_compile/_data/mnist8k.npz")
    assert shipped == resources.files("hbll_compile").joinpath("_data", "mnist8k.npz").read_bytes()


def test_no_file_reaches_outside_the_repository() -> None:
    """A user's clone has no sibling ``shared/`` folder: no code may reach it, by relative or absolute path."""
    outside = re.compile(rf"\.\./shared/|{re.escape(str(ROOT.parent / 'shared'))}")
    offenders = [f"{path.relative_to(ROOT)}: {line.strip()}"
                 for folder in ("hbll_compile", "examples", "benchmarks", "tests")
                 for path in sorted((ROOT / folder).rglob("*.py"))
                 for line in path.read_text(encoding="utf-8").splitlines()
                 if outside.search(line)]
    assert offenders == []


def test_charlm_example_runs() -> None:
    results = _example("charlm_gpt").main(["--steps", "4", "--dim", "32", "--layers", "2", "--blocks", "2",
                                           "--context", "16", "--batch", "4"])
    assert set(results) == {"bp", "hbll"} and all(v > 1 for v in results.values())


def test_benchmark_table_runs_cells_and_renders(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/table.py on a tiny setting (a narrow ResMLP in place of the family's network, forked into
    the worker process): BP trains once and writes a row per N; HBLL rows carry the end-of-training gradient
    report; --summarise renders the rows it wrote."""
    table = _example("table", ROOT / "benchmarks")
    monkeypatch.setitem(table.FAMILIES, "resmlp", table.Family(lambda: _example("mnist_resmlp").ResMLP(32, 8),
                                                               "flat", (4, 8)))
    out = tmp_path / "rows.jsonl"
    common = ["--families", "resmlp", "--seeds", "0", "--epochs", "1", "--limit", "256", "--out", str(out)]
    table.main([*common, "--objectives", "bp", "--blocks", "4", "8"])
    table.main([*common, "--objectives", "hbll", "--blocks", "8"])
    table.main([*common, "--objectives", "bp", "--blocks", "4", "8", "--resume"])  # both rows are there: no run
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["objective"], r["blocks"], r["trained_blocks"]) for r in rows] == [("bp", 4, 4), ("bp", 8, 4),
                                                                                 ("hbll", 8, 8)]
    bp4, bp8, hbll8 = rows
    assert bp4["accuracy"] == bp8["accuracy"] and len(bp4["epoch_accuracy"]) == 1
    assert (bp4["critical_path"], bp8["critical_path"]) == (8, 16) and bp4["gradient"] is None
    torch.testing.assert_close(bp8["flops_ratio"], 1.0, rtol=0.02, atol=0.0)  # compiled BP counts as eager BP
    assert hbll8["flops_ratio"] > 1.0 and len(hbll8["gradient"]["block_cosine"]) == 8
    assert all(abs(c) <= 1.0 + 1e-6 for c in hbll8["gradient"]["block_cosine"])
    capsys.readouterr()
    table.main(["--summarise", str(out)])
    rendered = capsys.readouterr().out
    assert "| resmlp | 8 | hbll | 1 ep on 256 | 1 |" in rendered and "| resmlp | 4 | bp | 1 ep on 256 | 1 |" in rendered


def test_levers_head_schedule_sets_the_weight_each_step_uses() -> None:
    """benchmarks/levers.py's λ schedules, and the mechanism its hook relies on: a step uses the λ of the
    config in ``m.config`` at that moment, so replacing the config between steps changes the block loss."""
    levers = _example("levers", ROOT / "benchmarks")
    assert levers.head_weight("const", 99, 100) == 0.5
    assert levers.head_weight("lin", 0, 100) == 0.5 and levers.head_weight("lin", 100, 100) < 1e-6
    assert levers.head_weight("epoch1", 19, 100) == 0.5 and levers.head_weight("epoch1", 20, 100) < 1e-6
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))

    def block_grad(config: hc.HBLLConfig, schedule: str | None = None) -> torch.Tensor:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Tanh(),
                                  torch.nn.Linear(8, 3))
        m = hc.hbll_compile(net, (x[:2],), blocks=2, loss=F.cross_entropy, config=config)
        hook = levers._scheduled(schedule, 5) if schedule else None
        for _ in range(2):  # the second step finds the wavefront full: block 1 trains on its path and head
            if hook:
                hook(m)
            m.zero_grad(set_to_none=True)
            m.training_step(x, target=y)
        return next(m.blocks[0].parameters()).grad

    heads = hc.HBLLConfig(local_head_weight=None)  # the schedules need heads; the default has none
    scheduled = block_grad(heads, "epoch1")  # λ = 0.5 at step 0, then ~0
    assert levers.head_weight("epoch1", 0, 5) == 0.5 and levers.head_weight("epoch1", 1, 5) < 1e-6
    torch.testing.assert_close(scheduled, block_grad(hc.HBLLConfig(local_head_weight=1e-9)))
    assert not torch.allclose(scheduled, block_grad(heads))


def test_cifar10_example_reads_local_batches(tmp_path: Path) -> None:
    write_cifar10(tmp_path / "cifar-10-batches-py")
    results = _example("cifar10_resnet").main(["--data", str(tmp_path), "--epochs", "1", "--blocks", "4",
                                               "--batch", "5", "--objectives", "hbll"])
    assert 0.0 <= results["hbll"] <= 1.0


def test_cifar10_example_says_where_to_put_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        _example("cifar10_resnet").load(str(tmp_path))


def test_cli_inspect_prints_table_and_draws_tree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "tree.png"
    code = cli(["inspect", f"{EXAMPLES / 'cifar10_resnet.py'}:build_model", "--input-shape", "2,3,32,32",
                "--blocks", "4", "--png", str(png)])
    out = capsys.readouterr().out
    assert code == 0 and "tree level" in out and "B×" in out
    assert png.stat().st_size > 1000


def test_cli_reports_compile_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    factory = tmp_path / "bad.py"
    factory.write_text("import torch\n\ndef build():\n    return torch.nn.Sequential(torch.nn.Linear(4, 4))\n")
    code = cli(["inspect", f"{factory}:build", "--input-shape", "2,4", "--blocks", "5"])
    assert code == 2 and "CutError" in capsys.readouterr().err
