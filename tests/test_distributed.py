"""Distributed HBLL (``hc.distribute``) against the single-process wavefront step, on gloo with spawned
processes that read the torchrun environment variables.

Each launch runs several scenarios in one process group (starting processes dominates the cost); the
parent recomputes the single-process trajectory and compares losses, every tensor of the state dict
(the wavefront ring included) and the file ``dm.save`` writes.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from helpers import ZOO, compile_case, loss_for, targets

import hbll_compile as hc
from hbll_compile.runtime.distributed import place

STEPS = 10
BATCH = 6


def _batches(case: str, steps: int = STEPS) -> list[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
    """The same batches in every process: seeded per step."""
    out = []
    for t in range(steps):
        inputs = ZOO[case].example(batch=BATCH, seed=100 + t)
        torch.manual_seed(200 + t)
        out.append((inputs, targets(case, BATCH)))
    return out


def _compile(case: str, n: int) -> hc.HBLLModel:
    """A zoo case compiled at ``n`` blocks under ``CONFIG``, with the GPT's dropout off: each process draws its
    own random numbers, so only a model without random ops can equal the single-process run bit for bit."""
    c = ZOO[case]
    model = c.build()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = hc.HBLLConfig(**CONFIG.get((case, n), {}))
    return hc.hbll_compile(model, c.example(), blocks=n, loss=loss_for(case), config=config)


@functools.cache
def _reference(case: str, n: int, lead: float = 0.0) -> tuple[list[float], dict[str, torch.Tensor], int]:
    """The single-process wavefront run (blocks' weights predicted ``lead`` steps ahead): per-step losses,
    the final state dict, and the first block of the last of ``WORLD[(case, n)]`` ranks."""
    m = _compile(case, n)
    first_of_last_rank = place(m, WORLD[(case, n)]).first[-1]
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run: another thread count sums in another order
    try:
        for inputs, y in _batches(case):
            opt.zero_grad()
            with hc.predicted_weights(m, opt, lead):
                losses.append(float(m.training_step(*inputs, target=y)))
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return losses, m.state_dict(), first_of_last_rank


def _train(case: str, n: int, out: Path, *, save: bool = False, sync_every: int = 1, lead: float = 0.0) -> None:
    """Worker side: STEPS distributed steps (blocks' weights predicted ``lead`` steps ahead); writes this
    rank's losses and, on rank 0, the gathered state."""
    m = _compile(case, n)
    dm = hc.distribute(m, sync_every=sync_every)
    opt = torch.optim.Adam(dm.parameters(), lr=1e-2)
    losses = []
    for inputs, y in _batches(case):
        opt.zero_grad()
        with hc.predicted_weights(dm, opt, lead):
            losses.append(float(dm.training_step(*inputs, target=y)))
        opt.step()
    rank, name = torch.distributed.get_rank(), _name(case, n, sync_every, lead)
    torch.save({"losses": losses, "describe": dm.describe()}, out / f"{name}.rank{rank}.pt")
    if save:
        dm.save(out / f"{name}.safetensors")
    state = dm.gather_state_dict()
    if state is not None:
        torch.save(state, out / f"{name}.state.pt")


def _name(case: str, n: int, sync_every: int = 1, lead: float = 0.0) -> str:
    return f"{case}{n}" + (f"sync{sync_every}" if sync_every > 1 else "") + (f"lead{lead:g}" if lead else "")


def _dying_loss(rank: int, calls: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A task loss that kills its own process (SIGKILL) on its ``calls``-th call on ``rank``: mid-step."""
    seen = [0]

    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen[0] += 1
        if int(os.environ["RANK"]) == rank and seen[0] == calls:
            Path(os.environ["HBLL_TEST_OUT"], "killed_at").write_text(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
        return torch.nn.functional.cross_entropy(out, y)

    return loss


def _killed(out: Path) -> None:
    c = ZOO["resmlp"]
    m = hc.hbll_compile(c.build(), c.example(), blocks=4, loss=_dying_loss(rank=1, calls=5))
    torch.distributed.barrier()  # both ranks start this scenario before rank 1 can die
    dm = hc.distribute(m, timeout=20.0)
    opt = torch.optim.SGD(dm.parameters(), lr=0.1)
    try:
        for inputs, y in _batches("resmlp", steps=50):
            opt.zero_grad()
            dm.training_step(*inputs, target=y)
            opt.step()
        result: dict[str, Any] = {"error": None}
    except hc.DistributedError as err:
        result = {"error": str(err), "node": err.node, "at": time.time()}
    torch.save(result, out / f"survivor{torch.distributed.get_rank()}.pt")


SCENARIOS: dict[str, Callable[[Path], object]] = {
    # the killed rank ends the process group, so that scenario comes last
    "two": lambda out: (_train("resmlp", 4, out, save=True), _train("cnn_bn", 3, out), _train("gpt", 4, out),
                        _train("resmlp", 4, out, sync_every=3), _train("gpt", 4, out, lead=2.0), _killed(out)),
    "three": lambda out: (_train("resmlp", 5, out), torch.distributed.destroy_process_group()),
}
WORLD = {("resmlp", 4): 2, ("cnn_bn", 3): 2, ("gpt", 4): 2, ("resmlp", 5): 3}
"""How many ranks train each (case, blocks) in the launches above."""
CONFIG: dict[tuple[str, int], dict[str, Any]] = {("resmlp", 5): {"coupler_copies": 1}}
"""HBLLConfig fields of a (case, blocks) beyond the defaults: copies of blocks other ranks own."""


def _worker(rank: int, world: int, port: int, scenario: str, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HBLL_TEST_OUT=out)
    SCENARIOS[scenario](Path(out))


def _launch(scenario: str, world: int, out: Path, timeout: float = 240.0) -> list[int | None]:
    """Start ``world`` spawned ranks and wait for them; returns their exit codes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, world, port, scenario, str(out))) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(1.0, deadline - time.monotonic()))
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    return codes


def _check_against_reference(out: Path, case: str, n: int, lead: float = 0.0) -> None:
    ref_losses, ref_state, first_of_last_rank = _reference(case, n, lead)
    last = torch.load(out / f"{_name(case, n, lead=lead)}.rank{WORLD[(case, n)] - 1}.pt")["losses"]
    compared = [(a, b) for t, (a, b) in enumerate(zip(last, ref_losses), 1) if t >= first_of_last_rank]
    assert len(compared) >= STEPS - n + 1
    assert all(not math.isnan(a) for a, _ in compared)
    torch.testing.assert_close(torch.tensor([a for a, _ in compared]), torch.tensor([b for _, b in compared]),
                               atol=1e-5, rtol=1e-5)
    state = torch.load(out / f"{_name(case, n, lead=lead)}.state.pt")
    assert state.keys() == ref_state.keys()
    for key, value in ref_state.items():
        torch.testing.assert_close(state[key], value, atol=1e-5, rtol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("two")
    assert _launch("two", 2, out) == [0, -signal.SIGKILL]  # rank 1 kills itself in the last scenario
    return out


def test_two_ranks_reproduce_single_process_trajectory(two_ranks: Path) -> None:
    _check_against_reference(two_ranks, "resmlp", 4)


def test_batchnorm_model_with_blocks_not_divisible_by_ranks(two_ranks: Path) -> None:
    _check_against_reference(two_ranks, "cnn_bn", 3)


def test_tied_weight_gpt_stays_tied_and_exact(two_ranks: Path) -> None:
    m = _compile("gpt", 4)
    owners = {i for i, block in enumerate(m.blocks, 1) for name, _ in block.named_parameters() if "lm_head" in name}
    placement = place(m, 2)
    assert {placement.block_rank(i) for i in owners} == {0, 1}  # the tie really crosses the two ranks
    _check_against_reference(two_ranks, "gpt", 4)


def test_weight_prediction_moves_replicas_with_their_owners(two_ranks: Path) -> None:
    """Each rank predicts only its own blocks; the refresh hands the moved weights to the other ranks'
    replicas, so the run equals the single-process run with prediction (tied weights included)."""
    _check_against_reference(two_ranks, "gpt", 4, lead=2.0)
    assert _reference("gpt", 4, 2.0)[0] != _reference("gpt", 4)[0], "prediction changes the trajectory"


def test_save_on_rank_zero_loads_in_one_process(two_ranks: Path) -> None:
    _, ref_state, _ = _reference("resmlp", 4)
    loaded = hc.HBLLModel.load(two_ranks / "resmlp4.safetensors", ZOO["resmlp"].build, loss=loss_for("resmlp"))
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, ref_state[key], atol=1e-5, rtol=1e-5)


def test_stale_replicas_with_sync_every_train_close_to_exact_run(two_ranks: Path) -> None:
    ref_losses, _, first_of_last_rank = _reference("resmlp", 4)
    stale = torch.load(two_ranks / "resmlp4sync3.rank1.pt")["losses"][first_of_last_rank - 1:]
    exact = torch.tensor(ref_losses[first_of_last_rank - 1:])
    assert torch.isfinite(torch.tensor(stale)).all()
    torch.testing.assert_close(torch.tensor(stale), exact, rtol=0.1, atol=0.0)  # replicas lag by up to 2 steps


def test_describe_shows_placement(two_ranks: Path) -> None:
    text = torch.load(two_ranks / "resmlp4.rank0.pt")["describe"]
    assert "HBLL on 2 ranks" in text and "1..2" in text and "3..4" in text and "h2 from 0" in text


def test_three_ranks_with_blocks_not_divisible_by_ranks_and_coupler_copies(tmp_path: Path) -> None:
    assert _launch("three", 3, tmp_path) == [0, 0, 0]
    _check_against_reference(tmp_path, "resmlp", 5)


def test_killed_rank_ends_the_survivor_with_distributed_error(two_ranks: Path) -> None:
    result = torch.load(two_ranks / "survivor0.pt")
    assert result["error"] is not None, "the survivor finished all steps although its peer was killed"
    assert result["node"] == "rank 1" and "rank 1 failed" in result["error"]
    assert result["at"] - float((two_ranks / "killed_at").read_text()) < 60


def test_distribute_without_process_group_or_torchrun_env_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(hc.DistributedError, match="torchrun") as info:
        hc.distribute(compile_case("mlp", 2))
    assert info.value.remedy and "torchrun" in info.value.remedy


def test_tree_mode_and_too_many_ranks_are_refused() -> None:
    with pytest.raises(hc.DistributedError, match="wavefront"):
        hc.distribute(compile_case("mlp", 2, inputs="tree"))
    with pytest.raises(hc.DistributedError, match="3 ranks cannot share 2 blocks"):
        place(compile_case("mlp", 2), 3)


@pytest.mark.slow
def test_example_runs_under_torchrun(tmp_path: Path) -> None:
    """The README's launch line, for real: torchrun's agent, store and environment."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    saved = tmp_path / "m.safetensors"
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "examples/distributed_resmlp.py",
         "--limit", "512", "--depth", "4", "--blocks", "4", "--width", "32", "--save", str(saved)],
        cwd=root, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "held-out accuracy after 4 steps on 2 ranks" in run.stdout
    from mnist_resmlp import build_model

    loaded = hc.HBLLModel.load(saved, lambda: build_model(32, 4), loss=torch.nn.functional.cross_entropy)
    assert int(loaded.state_dict()["pipeline.steps"]) == 4
