"""Differential check of a compiled model on a GPU against the same model on the CPU.

For every model of the test zoo (``tests/helpers.py``), compiled at its largest block count, and for
recurrent models compiled ``over="time"`` (a GRU classifier at N=4, an LSTM language model at N=4),
it compiles two identical copies (dropout off), moves one with ``.to(device)`` and checks, with TF32 off:

- the compiled forward on the device equals the CPU's (``torch.testing.assert_close``, atol 1e-4);
- three HBLL training steps (AdamW) give the same finite task losses (rtol 1e-3, atol 1e-4);
- the device model's ``state_dict`` loads into the CPU copy and both then agree again.

It prints one line per model and exits non-zero when any check fails. ``benchmarks/gpu.sh`` runs it
first; ``--device cpu`` checks the script itself (CPU against CPU).

Example:
    python benchmarks/cuda_check.py --device cuda
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import hbll_compile as hc

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "examples")]
from helpers import ZOO, RecurrentClassifier, RecurrentLM, loss_for, seq_loss, targets  # noqa: E402

Build = Callable[[], tuple[hc.HBLLModel, tuple[torch.Tensor, ...], torch.Tensor]]


def zoo_case(name: str) -> Build:
    case = ZOO[name]

    def build() -> tuple[hc.HBLLModel, tuple[torch.Tensor, ...], torch.Tensor]:
        model = case.build()
        for module in model.modules():  # dropout draws from per-device generators: no common stream
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        m = hc.hbll_compile(model, case.example(), blocks=max(case.blocks), loss=loss_for(name))
        torch.manual_seed(2)
        return m, case.example(batch=8, seed=3), targets(name, 8)
    return build


def recurrent_classifier() -> tuple[hc.HBLLModel, tuple[torch.Tensor, ...], torch.Tensor]:
    torch.manual_seed(0)
    m = hc.hbll_compile(RecurrentClassifier("GRU", layers=2), (torch.randn(2, 12, 5),), blocks=4,
                        loss=F.cross_entropy, over="time")
    torch.manual_seed(3)
    return m, (torch.randn(8, 12, 5),), torch.randint(0, 3, (8,))


def recurrent_lm() -> tuple[hc.HBLLModel, tuple[torch.Tensor, ...], torch.Tensor]:
    torch.manual_seed(0)
    m = hc.hbll_compile(RecurrentLM("LSTM"), (torch.randint(0, 11, (2, 12)),), blocks=4, loss=seq_loss,
                        over="time")
    torch.manual_seed(3)
    return m, (torch.randint(0, 11, (8, 12)),), torch.randint(0, 11, (8, 12))


CASES: dict[str, Build] = {**{name: zoo_case(name) for name in ZOO},
                           "gru2_over_time": recurrent_classifier, "lstm_lm_over_time": recurrent_lm}


def check(build: Build, device: torch.device) -> None:
    """Raises AssertionError (from ``assert_close``) where the device copy departs from the CPU copy."""
    cpu, inputs, y = build()
    dev, _, _ = build()
    dev.to(device)
    on_dev = tuple(t.to(device) for t in inputs)
    with torch.no_grad():
        torch.testing.assert_close(dev.eval()(*on_dev).cpu(), cpu.eval()(*inputs), atol=1e-4, rtol=1e-4)
    cpu.train()
    dev.train()
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (cpu, dev)]
    for _ in range(3):
        losses = []
        for m, opt, xs, target in ((cpu, opts[0], inputs, y), (dev, opts[1], on_dev, y.to(device))):
            opt.zero_grad()
            losses.append(m.training_step(*xs, target=target).detach().cpu())
            opt.step()
        assert torch.isfinite(losses[1]), f"non-finite loss {losses[1]} on {device}"
        torch.testing.assert_close(losses[1], losses[0], atol=1e-4, rtol=1e-3)
    cpu.load_state_dict({k: v.cpu() for k, v in dev.state_dict().items()})
    with torch.no_grad():
        torch.testing.assert_close(dev.eval()(*on_dev).cpu(), cpu.eval()(*inputs), atol=1e-4, rtol=1e-4)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    failed = 0
    for case in args.cases:
        try:
            check(CASES[case], device)
            print(f"ok      {case} on {name}", flush=True)
        except Exception:  # report every case, then fail once
            failed += 1
            print(f"FAILED  {case} on {name}\n{traceback.format_exc(limit=4)}", flush=True)
    print(f"{len(args.cases) - failed}/{len(args.cases)} models agree with the CPU on {name}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
