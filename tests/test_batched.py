"""The batched executor (``HBLLConfig(executor="batched")``): same gradients as the loop, stacked
parameters as the single source of truth, BatchNorm and tied-weight fallbacks, conversions."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import ZOO, seq_loss, targets
from torch.testing import assert_close

import hbll_compile as hc
from hbll_compile.runtime._batching import BUFFERS, TIED, StackedBlocks

TOLERANCE = 1e-5


def _compile(case: str, n: int, executor: str, **config) -> hc.HBLLModel:
    c = ZOO[case]
    loss = seq_loss if case == "gpt" else F.cross_entropy
    return hc.hbll_compile(c.build(), c.example(), blocks=n, loss=loss,
                           config=hc.HBLLConfig(executor=executor, **config))


def _batches(case: str, sizes: list[int]) -> list[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
    return [(ZOO[case].example(batch=b, seed=10 + k), targets(case, b)) for k, b in enumerate(sizes)]


def _max_grad_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    worst = 0.0
    for p, q in zip(a.parameters(), b.parameters()):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            worst = max(worst, (p.grad - q.grad).abs().max().item())
    return worst




@pytest.fixture
def calls(monkeypatch) -> list[tuple[int, ...]]:
    """The members of every vmapped call the batched executor makes."""
    made: list[tuple[int, ...]] = []
    original = StackedBlocks.__call__

    def spy(self: StackedBlocks, members: tuple[int, ...], *args) -> torch.Tensor:
        made.append(members)
        return original(self, members, *args)

    monkeypatch.setattr(StackedBlocks, "__call__", spy)
    return made


def _train_both(loop: hc.HBLLModel, batched: hc.HBLLModel, batches) -> None:
    """Step both models on the same batches (SGD with momentum in between), asserting equal gradients
    at every step and equal parameters at the end."""
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (loop, batched)]
    for step, (x, y) in enumerate(batches):
        for m, opt in zip((loop, batched), opts):
            opt.zero_grad()
            torch.manual_seed(step)  # the same dropout masks in both
            m.training_step(*x, target=y)
        assert _max_grad_diff(loop, batched) <= TOLERANCE, f"step {step}"
        for opt in opts:
            opt.step()
    assert_close(list(loop.parameters()), list(batched.parameters()), rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize(("n", "config"), [
    (4, {}),
    (8, {}),
    (8, {"inputs": "tree", "corrections": 1}),
    (8, {"local_head_weight": 0.5}),
], ids=["N4-wavefront", "N8-wavefront", "N8-tree", "N8-heads"])
def test_batched_equals_loop_on_a_residual_stack(n: int, config: dict, calls) -> None:
    loop, batched = _compile("resmlp", n, "loop", **config), _compile("resmlp", n, "batched", **config)
    assert batched._executor.batching.groups == (tuple(range(2, n)),)  # the stem and the head differ
    _train_both(loop, batched, _batches("resmlp", [8] * (n + 3)))
    assert tuple(range(n - 2)) in calls  # the whole group as one vmap
    assert ((0, 1) in calls) == (config.get("inputs") != "tree")  # and the first two in wavefront warm-up


def test_members_alike_in_shape_are_batched_and_the_rest_loop(calls) -> None:
    """Wavefront blocks hold batches of different steps: a smaller batch runs alone in the loop, the
    others still run as one vmap, over contiguous members or not."""
    loop, batched = _compile("resmlp", 8, "loop"), _compile("resmlp", 8, "batched")
    _train_both(loop, batched, _batches("resmlp", [8, 8, 8, 5, 8, 8, 8, 3, 8, 8, 8, 8]))
    # step 8: block 5 (position 3) holds the batch of 5; step 9: blocks 2 and 6 hold the batches of 3 and 5
    assert (0, 1, 2, 4, 5) in calls and (1, 2, 3, 5) in calls


def test_batchnorm_blocks_fall_back_with_equal_grads_and_statistics(calls) -> None:
    loop, batched = _compile("cnn_bn", 4, "loop"), _compile("cnn_bn", 4, "batched")
    plan = batched._executor.batching
    assert plan.groups == () and plan.fallbacks == {i: BUFFERS for i in range(1, 5)}
    _train_both(loop, batched, _batches("cnn_bn", [8] * 6))
    assert calls == []
    assert_close(list(loop.buffers()), list(batched.buffers()), rtol=0, atol=0)  # running statistics too


def test_gpt_groups_attention_and_mlp_blocks_with_context(calls) -> None:
    """GPT at N=8: attention halves (which read the batch size from the context) and MLP halves form two
    groups; the blocks holding the tied embedding and output head fall back."""
    loop, batched = _compile("gpt", 8, "loop"), _compile("gpt", 8, "batched")
    plan = batched._executor.batching
    assert plan.groups == ((2, 4, 6), (3, 5, 7)) and plan.fallbacks == {1: TIED, 8: TIED}
    assert batched._executor.stacks[(3, 5, 7)].context == ("sym_size_int_1",)
    _train_both(loop, batched, _batches("gpt", [4] * 8))
    # block i first runs at step i: the first two blocks of a group run batched from its second block on
    assert calls.count((0, 1)) == 4 and calls.count((0, 1, 2)) == 5


def test_attention_runs_in_its_math_form_inside_the_vmap(monkeypatch) -> None:
    """The fused attention kernels have no vmap batching rule (on CUDA their vmapped backward fails), so
    the vmapped call allows only the math backend; the loop keeps the fused ones."""
    flags: list[tuple[bool, bool]] = []
    original = StackedBlocks._call

    def spy(self: StackedBlocks, *args) -> torch.Tensor:
        flags.append((torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()))
        return original(self, *args)

    monkeypatch.setattr(StackedBlocks, "_call", spy)
    batched = _compile("gpt", 8, "batched")
    for x, y in _batches("gpt", [4] * 6):  # block 4 joins block 2 from step 4 on
        batched.training_step(*x, target=y)
    assert flags and set(flags) == {(False, True)}
    assert torch.backends.cuda.flash_sdp_enabled()


def test_stacks_are_the_single_source_of_truth() -> None:
    m = _compile("resmlp", 4, "batched")
    net = m.to_original()
    objects = [id(p) for p in net.parameters()]
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for x, y in _batches("resmlp", [8] * 4):
        opt.zero_grad()
        m.training_step(*x, target=y)
        opt.step()
    assert [id(p) for p in net.parameters()] == objects  # still the user's own parameters
    stack = m._executor.stacks[(2, 3)]  # block 2 holds residual blocks 2 and 3, block 3 holds 4 and 5
    for j, block in enumerate((m.blocks[1], m.blocks[2])):
        for p, stacked in zip(block.parameters(), stack.stacked, strict=True):
            assert p.data_ptr() == stacked[j].data_ptr()  # its storage is a slice of the stack
            assert p.grad.data_ptr() == stacked.grad[j].data_ptr()  # its gradient a view, not a copy
    weight = net.blocks[4].fc1.weight
    before = weight.detach().clone()
    opt.step()
    stacked = stack.stacked[stack.names.index("blocks.2.fc1.weight")]
    assert not torch.equal(before, weight) and torch.equal(weight, stacked[1])  # the update landed in the stack


def test_gradients_accumulate_like_autograd() -> None:
    """Two steps per optimizer step, gradients zeroed in place: the slices handed out accumulate."""
    loop, batched = _compile("resmlp", 4, "loop"), _compile("resmlp", 4, "batched")
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (loop, batched)]
    for step, (x, y) in enumerate(_batches("resmlp", [8] * 8)):
        for m, opt in zip((loop, batched), opts):
            if step % 2 == 0:
                opt.zero_grad(set_to_none=False)
            m.training_step(*x, target=y)
            if step % 2 == 1:
                opt.step()
        assert _max_grad_diff(loop, batched) <= TOLERANCE, f"step {step}"


def test_conversions_and_state_dict_round_trips_restack(tmp_path) -> None:
    loop, batched = _compile("resmlp", 4, "loop"), _compile("resmlp", 4, "batched")
    batches = _batches("resmlp", [8] * 5)
    _train_both(loop, batched, batches)
    state = copy.deepcopy(batched.state_dict())
    stack = batched._executor.stacks[(2, 3)]
    weight = batched.to_original().blocks[4].fc2.weight  # in block 3, the group's second member
    for m in (loop, batched):
        m.double().reset_pipeline()
    _train_both(loop, batched, [((x.double(),), y) for (x,), y in batches])
    assert weight.dtype == torch.float64 and all(s.dtype == torch.float64 for s in stack.stacked)
    assert weight.data_ptr() == stack.stacked[stack.names.index("blocks.2.fc2.weight")][1].data_ptr()
    for assign in (False, True):  # copied into the stacks, or new parameters that are restacked
        for m in (loop, batched):
            m.float().load_state_dict(state, assign=assign)
            m.reset_pipeline()
        _train_both(loop, batched, batches)
    path = tmp_path / "batched.safetensors"
    batched.save(str(path))
    loaded = hc.HBLLModel.load(str(path), ZOO["resmlp"].factory, loss=F.cross_entropy)
    x = ZOO["resmlp"].example(batch=3)
    assert loaded.config.executor == "batched" and torch.equal(loaded.eval()(*x), batched.eval()(*x))
