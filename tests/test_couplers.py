"""Coupler options on compiled models: label-conditioned couplers and causal token mixing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import ZOO, compile_case, targets, train_on_teacher

import hbll_compile as hc
from hbll_compile.nn import Coupler
from hbll_compile.runtime.schedule import Task, TaskKind


def accumulated_grads(m: hc.HBLLModel, steps: int, x: tuple[torch.Tensor, ...], y: torch.Tensor) -> dict:
    torch.manual_seed(0)
    m.zero_grad()
    for _ in range(steps):
        m.training_step(*x, target=y)
    return {name: p.grad for name, p in m.named_parameters() if p.grad is not None}


def seeded_case(case: str, n: int, **config: object) -> hc.HBLLModel:
    torch.manual_seed(0)
    return compile_case(case, n, **config)


def test_label_conditioning_changes_nothing_at_init() -> None:
    """Same seed, same weights: the first steps give every shared parameter the same gradient. (The
    MLP's couplers are at the minimum width either way; elsewhere the projection's cost can narrow them.)"""
    x, y = ZOO["mlp"].example(batch=8), targets("mlp", 8)
    plain_model, labelled_model = seeded_case("mlp", 4), seeded_case("mlp", 4, coupler_condition="label")
    assert [p.hidden for p in plain_model.coupler_plans] == [p.hidden for p in labelled_model.coupler_plans]
    plain = accumulated_grads(plain_model, 4, x, y)
    labelled = accumulated_grads(labelled_model, 4, x, y)
    shared = plain.keys() & labelled.keys()
    assert len(shared) == len(plain) and shared
    for name in shared:
        torch.testing.assert_close(labelled[name], plain[name], rtol=0, atol=0, msg=name)
    extra = {name for name in labelled if name not in plain}
    assert extra and all(".cond" in name or "encoder" in name for name in extra)


def test_label_conditioned_couplers_train_use_the_label_and_stay_invertible() -> None:
    m, x, y, losses = train_on_teacher({"coupler_condition": "label"})
    assert losses[-1] < 0.7 * losses[8]
    m.eval()
    env = m.environment(x)
    chain = [x]
    for i in range(1, m.tree.n_blocks + 1):
        chain.append(m.run_block(i, chain[-1], env).detach())
    for plan in m.coupler_plans:
        coupler = m.couplers[str(plan.node)]
        h = chain[plan.source]
        out = coupler(h, coupler.encode(y))
        assert not torch.allclose(out, coupler(h, coupler.encode(None))), "a trained coupler reads the label"
        if coupler.injective:
            torch.testing.assert_close(coupler.inverse(out, coupler.encode(y)), h, atol=1e-5, rtol=1e-5)


def test_depth_inference_without_labels_uses_the_no_label_vector() -> None:
    m, x, y, _ = train_on_teacher({"coupler_condition": "label"}, steps=20)
    m.eval()
    with torch.no_grad():
        got = m(x, depth=0)
        root = m.couplers[str(m.tree.root.id)]
        expected = m.run_tail(root(x, root.encode(torch.full_like(y, -100))), m.environment(x))
    torch.testing.assert_close(got, expected)
    assert torch.equal(m(x), m.to_original()(x)), "the exact chain never sees labels"


def test_gradient_report_with_label_conditioning() -> None:
    m = compile_case("gpt", 4, coupler_condition="label", local_head_weight=0)  # heads would add their term
    x, y = ZOO["gpt"].example(batch=4), targets("gpt", 4)
    for _ in range(4):
        m.training_step(*x, target=y)
    exact = m.gradient_report(*x, target=y, paths="exact")
    assert all(abs(b.cosine - 1) < 1e-5 for b in exact.blocks if b.cosine is not None)
    report = m.gradient_report(*x, target=y)
    assert report.to_dict() == m.gradient_report(*x, target=y).to_dict()


def test_label_conditioning_refuses_what_is_not_classification() -> None:
    net = torch.nn.Sequential(*[torch.nn.Conv2d(3, 3, 3, padding=1) for _ in range(4)])
    with pytest.raises(hc.CompileError, match="coupler_condition='label'.*logits") as info:
        hc.hbll_compile(net, (torch.randn(2, 3, 8, 8),), blocks=4, loss=F.mse_loss,
                        config=hc.HBLLConfig(coupler_condition="label"))
    assert "coupler_condition='none'" in info.value.remedy
    m = compile_case("mlp", 4, coupler_condition="label")
    x = ZOO["mlp"].example(batch=4)
    with pytest.raises(hc.TrainingError, match="integer class labels of shape \\(B\\).*float32"):
        m.training_step(*x, target=torch.randn(4))
    with pytest.raises(hc.TrainingError, match="label above 4"):
        m.training_step(*x, target=torch.tensor([0, 1, 2, 5]))
    with pytest.raises(ValueError, match="label_dropout"):
        hc.HBLLConfig(label_dropout=1.0)


def test_training_export_refuses_label_conditioned_couplers(tmp_path) -> None:
    m = compile_case("mlp", 4, coupler_condition="label")
    with pytest.raises(hc.ExportError, match="labels") as info:
        hc.export_training_artifacts(m, tmp_path)
    assert info.value.node == "coupler_condition"


@pytest.mark.parametrize("mixing", ["causal_conv", "causal_attention"])
def test_causal_token_mixing_keeps_depth_subnetworks_causal(mixing: str) -> None:
    m = compile_case("gpt", 4, coupler_mixing=mixing)
    assert all(c.layers[0].f.mix is not None for c in m.couplers.values())
    x, y = ZOO["gpt"].example(batch=2), targets("gpt", 2)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(6):
        opt.zero_grad()
        m.training_step(*x, target=y)
        opt.step()
    m.eval()
    (ids,) = x
    changed = ids.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 50
    for d in range(m.tree.depth):
        before, after = m(ids, depth=d), m(changed, depth=d)
        torch.testing.assert_close(after[:, :9], before[:, :9], rtol=0, atol=0)
        assert not torch.allclose(after[:, 9:], before[:, 9:])


def test_coupler_options_are_recorded_in_the_plan_budget() -> None:
    """Both options stay within the coupler's FLOP budget (their cost is part of the search)."""
    for config in ({"coupler_condition": "label"}, {"coupler_mixing": "causal_conv"},
                   {"coupler_mixing": "causal_attention"}):
        m = compile_case("gpt", 4, **config)
        for plan in m.coupler_plans:
            coupler = m.couplers[str(plan.node)]
            assert isinstance(coupler, Coupler)
            assert plan.flops == coupler.flops() and (plan.flops <= plan.budget or plan.hidden == 8)


@pytest.mark.parametrize(("case", "copies"), [("resmlp", 1), ("gpt", 2), ("cnn_bn", 1)])
def test_coupler_copies_run_the_first_spanned_blocks_with_live_weights(case: str, copies: int) -> None:
    """A coupler with copies runs the first ``copies`` blocks of its span exactly (all but the last one),
    with the blocks' current weights, then its learned part; the GPT's token-input couplers start with
    block 1 either way."""
    plain, m = seeded_case(case, 4), seeded_case(case, 4, coupler_copies=copies)
    for base, plan in zip(plain.coupler_plans, m.coupler_plans):
        a, b = plan.span
        assert plan.source == max(base.source, min(a + copies, b - 1))
        assert plan.flops <= plan.budget or plan.hidden == 8, "the learned part keeps to its per-block budget"
    x, y = ZOO[case].example(batch=4), targets(case, 4)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(3):  # the blocks move: a stale copy would no longer match the chain below
        opt.zero_grad()
        m.training_step(*x, target=y)
        opt.step()
    m.eval()
    env = m.environment(*x)
    chain = [x[0]]
    with torch.no_grad():
        for i in range(1, m.tree.n_blocks + 1):
            chain.append(m.run_block(i, chain[-1], env))
        for plan in m.coupler_plans:
            want = m.run_coupling(plan.node, chain[plan.source], env)
            want = m.run_tail(want, env) if plan.runs_tail else want
            torch.testing.assert_close(m.run_coupler(plan.node, chain[plan.span[0]], env), want, rtol=0, atol=0)


def test_coupler_copies_train_and_leave_the_copied_blocks_to_their_own_objective() -> None:
    """Copies are fixed maps: a coupler's update task gives the blocks it runs no gradient, and the model
    still learns the teacher."""
    m, x, y, losses = train_on_teacher({"coupler_copies": 1})
    assert losses[-1] < 0.7 * losses[8]
    assert [p.source for p in m.coupler_plans] == [1, 1, 3]
    seen: dict[Task, list[torch.Tensor | None]] = {}
    checked = []

    def hook(task: Task, done: bool) -> None:
        if task.kind is not TaskKind.COUPLER_UPDATE:
            return
        grads = [None if p.grad is None else p.grad.clone() for p in m.blocks.parameters()]
        if not done:
            seen[task] = grads
            return
        for before, after in zip(seen.pop(task), grads):
            assert (before is None and after is None) or torch.equal(before, after)
        checked.append(task.unit.id)

    m.register_task_hook(hook)
    m.training_step(x, target=y)
    assert sorted(checked) == [p.node for p in m.coupler_plans]
    with pytest.raises(ValueError, match="coupler_copies"):
        hc.HBLLConfig(coupler_copies=-1)
