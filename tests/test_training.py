"""Training runtime: schedules, locality of gradients, objectives against eager PyTorch, depth inference, save/load."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import MLP, ZOO, compile_case, seq_loss, targets, train_on_teacher, units_trained

import hbll_compile as hc
from hbll_compile.runtime.schedule import Unit, Value


@pytest.mark.parametrize("n", [8, 16, 64])
def test_default_critical_path_is_logarithmic(n: int) -> None:
    net = MLP(d_in=6, width=8, depth=n, classes=3)
    m = hc.hbll_compile(net, (torch.randn(2, 6),), blocks=n, loss=F.cross_entropy)
    L = math.ceil(math.log2(n))
    m.schedule.validate()
    assert m.schedule.critical_path() <= 3 * L + 2
    assert hc.hbll_compile(net, (torch.randn(2, 6),), blocks=n,
                           config=hc.HBLLConfig(objective="bp")).schedule.critical_path() == 2 * n


@pytest.mark.parametrize("inputs", ["tree", "wavefront"])
def test_no_gradient_crosses_a_block_boundary(inputs: str) -> None:
    """Every backward of a task reaches only the unit that task trains."""
    m = compile_case("resmlp", 4, inputs=inputs, local_head_weight=0.5)
    owners = {Unit.block(i): {id(p) for p in m.blocks[i - 1].parameters()} for i in range(1, 5)}
    for key, head in m.heads.items():  # a block's update trains its fused local head too
        owners[Unit.block(int(key))] |= {id(p) for p in head.parameters()}
    owners |= {Unit.coupler(int(k)): {id(p) for p in c.parameters()} for k, c in m.couplers.items()}
    x, y = ZOO["resmlp"].example(batch=8), targets("resmlp", 8)
    trained = units_trained(m, owners, x, y, steps=6)
    assert set(trained) == set(owners)  # every block and coupler was trained and checked
    calls = len(trained)
    m.training_step(*x, target=y)
    assert len(trained) == calls  # a removed hook is not called


def test_bp_objective_equals_eager_backprop() -> None:
    case = ZOO["resnet"]
    model = case.build()
    reference = copy.deepcopy(model)
    m = hc.hbll_compile(model, case.example(), blocks=4, loss=F.cross_entropy, config=hc.HBLLConfig(objective="bp"))
    x, y = case.example(batch=6), targets("resnet", 6)
    loss = m.training_step(*x, target=y)
    expected = F.cross_entropy(reference(*x), y)
    expected.backward()
    assert abs(loss.item() - expected.item()) < 1e-5
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4)


def test_last_block_update_equals_its_own_loss_gradient() -> None:
    m = compile_case("mlp", 4, inputs="tree", corrections=1)
    x, y = ZOO["mlp"].example(batch=8), targets("mlp", 8)
    m.training_step(*x, target=y)
    last = m.blocks[-1]
    got = [p.grad.clone() for p in last.parameters()]
    # block N's input in tree mode is the sweep-K estimate of boundary N-1; recompute it through the executor
    h = m._executor.read(Value.h(len(m.blocks) - 1, sweep=1))
    for p in last.parameters():
        p.grad = None
    F.cross_entropy(m.run_block(len(m.blocks), h, m.environment(*x)), y).backward()
    for g, p in zip(got, last.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)


def test_wavefront_trains_every_unit_and_updates_batchnorm_once_per_step() -> None:
    m = compile_case("cnn_bn", 4)
    model = m.to_original()
    bns = [mod for mod in model.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
    x, y = ZOO["cnn_bn"].example(batch=8), targets("cnn_bn", 8)
    steps = 7
    for _ in range(steps):
        m.zero_grad()
        loss = m.training_step(*x, target=y)
        assert torch.isfinite(loss)
    assert all(p.grad is not None for p in m.parameters())
    # block i first runs at step i, so its BatchNorms count steps - i + 1 updates, never more
    block_of = {id(mod): i for i, b in enumerate(m.blocks, 1) for mod in b.modules()}
    for bn in bns:
        assert bn.num_batches_tracked.item() == steps - block_of[id(bn)] + 1


@pytest.mark.parametrize("config", [
    {"objective": "dgl"},
    {"objective": "hbll", "inputs": "tree", "correction": "parareal", "corrections": 2},
    {"objective": "hbll", "inputs": "tree", "correction": "jacobi", "corrections": 1},
    {"objective": "hbll", "local_head_weight": 0.5, "coupler_path_weight": 1.0},
], ids=["dgl", "tree-parareal", "tree-jacobi", "wavefront-heads-path"])
def test_every_objective_lowers_the_loss(config: dict) -> None:
    losses = train_on_teacher(config, steps=60)[3]
    assert losses[-1] < 0.7 * losses[8]


@pytest.mark.parametrize("case", ["gpt", "resnet", "two_inputs", "masked"])
def test_hbll_step_on_zoo_models(case: str) -> None:
    m = compile_case(case, 4)
    x, y = ZOO[case].example(batch=4), targets(case, 4)
    for _ in range(5):
        loss = m.training_step(*x, target=y)
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in m.parameters())
    for d in range(m.tree.depth + 1):
        assert m(*x, depth=d).shape == m(*x).shape


def test_depth_subnetworks_compose_their_frontier() -> None:
    m = compile_case("resmlp", 4)
    m.eval()
    x = ZOO["resmlp"].example(batch=3)
    assert torch.equal(m(*x, depth=m.tree.depth), m(*x))
    env = m.environment(*x)
    for d in range(m.tree.depth):
        h = x[0]
        for node in m.tree.nodes_at_depth(d):
            h = m.run_block(node.span[1], h, env) if node.is_leaf else m.run_coupler(node.id, h, env)
        assert torch.equal(m(*x, depth=d), h)
    assert m.depth_flops(0) < m.depth_flops(None) * 2


def test_save_load_round_trip(tmp_path) -> None:
    m = compile_case("gpt", 4)
    x, y = ZOO["gpt"].example(batch=4), targets("gpt", 4)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(6):
        opt.zero_grad()
        m.training_step(*x, target=y)
        opt.step()
    path = tmp_path / "gpt.safetensors"
    m.save(str(path))
    loaded = hc.HBLLModel.load(str(path), ZOO["gpt"].factory, loss=seq_loss)
    m.eval(), loaded.eval()
    for d in (None, 0, 1):
        assert torch.equal(m(*x, depth=d), loaded(*x, depth=d))
    original = loaded.to_original()
    assert original.lm_head.weight is original.wte.weight  # tied weights survive the round trip


def test_fit_and_depth_report() -> None:
    torch.manual_seed(0)
    x = torch.randn(128, 20)
    y = (x[:, 0] > 0).long()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    m = compile_case("mlp", 4)
    history = m.fit(data, epochs=20, optimizer=torch.optim.AdamW(m.parameters(), lr=1e-2), eval_loader=data)
    assert len(history["loss"]) == 20 and history["loss"][-1] < 0.5 * history["loss"][0]
    assert history["eval_accuracy"][-1] > 0.85
    rows = m.depth_report(data)
    assert [r["depth"] for r in rows] == list(range(m.tree.depth + 1))
    assert all(0 <= r["accuracy"] <= 1 and r["flops"] > 0 for r in rows)


def test_training_without_loss_is_refused() -> None:
    m = hc.hbll_compile(ZOO["mlp"].build(), ZOO["mlp"].example(), blocks=2)
    with pytest.raises(hc.TrainingError, match="loss"):
        m.training_step(*ZOO["mlp"].example(), target=torch.zeros(4, dtype=torch.long))


def _step_flops_ratio(blocks: int, depth: int, **config: object) -> float:
    """FLOPs of one HBLL step (pipeline full: every unit works) over one eager BP step, on the zoo's
    residual MLP with ``depth`` uniform blocks of width 64."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    net = type(ZOO["resmlp"].build())(d_in=20, width=64, depth=depth)
    x, y = torch.randn(32, 20), torch.randint(0, 5, (32,))
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(net(x), y).backward()
    bp = counter.get_total_flops()
    m = hc.hbll_compile(net, (x[:2],), blocks=blocks, loss=F.cross_entropy, config=hc.HBLLConfig(**config))
    for _ in range(blocks + 1):  # fill the wavefront pipeline
        m.training_step(x, target=y)
    with FlopCounterMode(display=False) as counter:
        m.training_step(x, target=y)
    return counter.get_total_flops() / bp


def test_hbll_step_flops_within_issue_budget() -> None:
    """Issue 4: one HBLL step costs at most 2.0x the FLOPs of one eager BP step (forward, loss,
    backward) on a residual MLP with N=16 (BENCHMARKS.md)."""
    assert 1.0 < _step_flops_ratio(16, 16) <= 2.0


def test_per_block_coupler_budget_stops_work_growing_with_n() -> None:
    """``coupler_budget="block"`` (the default): every coupler of a uniform stack gets the same budget,
    whatever its span, so one step's work grows little from N=16 to N=64 (issue 13's goal: 1.5x at N=16,
    1.6x at N=64); ``"span"`` takes the same fraction of the whole span."""
    m = compile_case("resmlp", 8)
    interior = {p.span: p.budget for p in m.coupler_plans if p.span[0] >= 2 and not p.runs_tail}  # no stem, no tail
    assert len(interior) == 2 and len(set(interior.values())) == 1, interior
    span = compile_case("resmlp", 8, coupler_budget="span")
    for plan, base in zip(m.coupler_plans, span.coupler_plans, strict=True):
        assert abs(base.budget - plan.budget * (plan.span[1] - plan.source)) <= plan.span[1] - plan.source
    # this narrow net (width 64) puts its minimum-width couplers at 1/8 of a block, so it measures 1.43 /
    # 1.69 where the benchmark's width-256 ResMLP measures 1.41 / 1.53 (and 1.71 / 2.63 under "span")
    at_16, at_64 = _step_flops_ratio(16, 64), _step_flops_ratio(64, 64)
    assert at_16 <= 1.5 and at_64 - at_16 <= 0.3 and at_16 < _step_flops_ratio(16, 64, coupler_budget="span") - 0.2, \
        (at_16, at_64)


def _bn_loader(seed: int = 0) -> torch.utils.data.DataLoader:
    torch.manual_seed(seed)
    x = torch.randn(96, 1, 16, 16) * 3 + 2
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, targets("cnn_bn", 96)), batch_size=32)


def test_recalibrated_batchnorm_statistics_are_the_plain_average_over_the_batches() -> None:
    """Oracle: with the first BatchNorm right after the first conv, its running mean is the mean of that
    conv's output over all (equal-sized) batches, whatever training left in it."""
    m = compile_case("cnn_bn", 2, objective="hbll")
    batches = list(_bn_loader())
    bns = [mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
    weight = m.get_parameter("blocks.0.features.0.weight")  # the first conv (no bias), captured as a function
    bns[0].running_mean.fill_(7.0)
    m.eval()
    empty = (batches[0][0][:0], batches[0][1][:0])  # skipped: it would count without adding statistics
    assert m.recalibrate_batchnorm([empty, *batches]) == len(bns) == 4
    assert not m.training and bns[0].momentum == 0.1  # mode and momentum as they were
    with torch.no_grad():
        out = F.conv2d(torch.cat([b[0] for b in batches]), weight, padding=1)
    torch.testing.assert_close(bns[0].running_mean, out.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-5)
    assert int(bns[0].num_batches_tracked) == len(batches)


def test_fit_recalibrates_batchnorm_from_the_last_batches_it_trained_on() -> None:
    """Differential: fit(recalibrate_bn=2) equals fit(recalibrate_bn=0) followed by a recalibration on the
    epoch's last two batches; the weights are the same either way, only the statistics differ."""
    runs = []
    for k in (2, 0):
        m = compile_case("cnn_bn", 2, objective="hbll")
        m.fit(_bn_loader(), epochs=1, progress=False, recalibrate_bn=k)
        runs.append(m)
    recalibrated, plain = runs
    bn = [b for b in plain.modules() if isinstance(b, torch.nn.BatchNorm2d)][-1]
    before = bn.running_mean.clone()
    plain.recalibrate_batchnorm(list(_bn_loader())[-2:])
    assert not torch.allclose(before, bn.running_mean)
    torch.testing.assert_close(recalibrated.state_dict(), plain.state_dict())


def test_recalibration_without_batchnorm_reads_no_batch_and_bad_counts_are_refused() -> None:
    def never() -> object:
        raise AssertionError("a model without BatchNorm must not read the batches")
        yield

    m = compile_case("mlp", 2)
    assert m.recalibrate_batchnorm(never()) == 0
    with pytest.raises(hc.TrainingError, match="recalibrate_bn"):
        m.fit(_bn_loader(), epochs=1, progress=False, recalibrate_bn=-1)
