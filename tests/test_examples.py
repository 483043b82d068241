"""The examples and the command line run end to end (small settings)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from test_data import write_cifar10

from hbll_compile.cli import main as cli

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_mnist_demo_runs(capsys: pytest.CaptureFixture[str]) -> None:
    results = _example("mnist_resmlp").main(["--epochs", "2", "--width", "32", "--depth", "4", "--blocks", "4",
                                             "--limit", "1536"])
    out = capsys.readouterr().out
    assert "critical path" in out and "held-out accuracy: BP" in out and "depth 0" in out
    assert results["bp"] > 0.5 and results["hbll"] > 0.5  # 24 steps on real digits reach well above chance


def test_charlm_example_runs() -> None:
    results = _example("charlm_gpt").main(["--steps", "4", "--dim", "32", "--layers", "2", "--blocks", "2",
                                           "--context", "16", "--batch", "4"])
    assert set(results) == {"bp", "hbll"} and all(v > 1 for v in results.values())


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
