"""Linear weight prediction (runtime/prediction.py): where it moves the blocks, that it puts them back, and
what fit does with it."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import ZOO, compile_case, targets
from torch.utils.data import DataLoader, TensorDataset

import hbll_compile as hc
from hbll_compile.runtime.prediction import default_lead, predicted_weights


def _stepped(optimizer_factory, steps: int = 3) -> tuple[hc.HBLLModel, torch.optim.Optimizer]:
    """A compiled residual MLP after ``steps`` optimizer steps, so that the optimizer holds state."""
    m = compile_case("resmlp", 4)
    opt = optimizer_factory(m.parameters())
    x, y = ZOO["resmlp"].example(batch=8), targets("resmlp", 8)
    for _ in range(steps):
        opt.zero_grad()
        m.training_step(*x, target=y)
        opt.step()
    return m, opt


def _snapshot(m: hc.HBLLModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_blocks_move_by_adamws_next_update_and_come_back_bit_for_bit() -> None:
    m, opt = _stepped(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1))
    before = _snapshot(m)
    group = opt.param_groups[0]
    b1, b2 = group["betas"]
    p = next(m.blocks[1].parameters())
    state = opt.state[p]
    t = float(state["step"])
    update = -group["lr"] * ((state["exp_avg"] / (1 - b1**t)) / ((state["exp_avg_sq"] / (1 - b2**t)).sqrt()
                                                                + group["eps"]) + group["weight_decay"] * p)
    expected = p.detach() + 2.5 * update
    with predicted_weights(m, opt, steps=2.5):
        torch.testing.assert_close(p.detach(), expected)
        moved = {k for k, v in m.state_dict().items() if not torch.equal(v, before[k])}
    assert moved and all(k.startswith("blocks.") for k in moved)  # couplers, heads and buffers stay
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_sgd_momentum_moves_blocks_along_its_buffer() -> None:
    m, opt = _stepped(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))
    p = next(m.blocks[0].parameters())
    expected = p.detach() - 3 * 0.1 * opt.state[p]["momentum_buffer"]
    with predicted_weights(m, opt, steps=3):
        torch.testing.assert_close(p.detach(), expected)


def test_weights_come_back_when_the_step_raises() -> None:
    m, opt = _stepped(torch.optim.Adam)
    before = _snapshot(m)
    with pytest.raises(RuntimeError, match="inside"), predicted_weights(m, opt, steps=4):
        raise RuntimeError("inside")
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_unreadable_optimizers_and_negative_leads_are_refused() -> None:
    m, opt = _stepped(torch.optim.Adagrad)
    with pytest.raises(hc.TrainingError, match="Adagrad") as info, predicted_weights(m, opt, steps=1):
        pass
    assert info.value.node == "optimizer"
    with pytest.raises(hc.TrainingError) as info, predicted_weights(m, opt, steps=-1):
        pass
    assert info.value.node == "predict_weights"
    with predicted_weights(m, opt, steps=0):  # off: nothing is read
        pass


def test_fit_predicts_half_the_blocks_ahead_under_the_wavefront_only() -> None:
    data = TensorDataset(torch.randn(64, 20), torch.randint(0, 5, (64,)))

    def trained(objective: str, lead: float | None) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        m = compile_case("resmlp", 4, objective=objective)
        m.fit(DataLoader(data, batch_size=16), epochs=2, progress=False, predict_weights=lead)
        return m.state_dict()

    assert default_lead(compile_case("resmlp", 4)) == 2.0
    assert default_lead(compile_case("resmlp", 4, inputs="tree")) == 0.0
    default, half, off = trained("hbll", None), trained("hbll", 2.0), trained("hbll", 0)
    assert all(torch.equal(default[k], half[k]) for k in default)
    assert not all(torch.equal(default[k], off[k]) for k in default)
    bp_default, bp_off = trained("bp", None), trained("bp", 0)
    assert all(torch.equal(bp_default[k], bp_off[k]) for k in bp_default)


def test_fit_does_not_predict_by_default_for_optimizers_it_cannot_read() -> None:
    """Plain SGD's next update is its next gradient: the default leaves the weights alone, an explicit lead
    is refused."""
    data = DataLoader(TensorDataset(torch.randn(32, 20), torch.randint(0, 5, (32,))), batch_size=16)
    m = compile_case("resmlp", 4)
    m.fit(data, epochs=1, optimizer=torch.optim.SGD(m.parameters(), lr=0.1), progress=False)
    with pytest.raises(hc.TrainingError) as info:
        m.fit(data, epochs=2, optimizer=torch.optim.SGD(m.parameters(), lr=0.1), progress=False, predict_weights=1)
    assert info.value.node == "optimizer"


def test_a_step_without_prediction_and_without_heads_warns_once() -> None:
    """The default has no local heads; a wavefront step outside prediction warns (once per model), one
    inside does not, and neither does a model with heads."""
    x, y = ZOO["resmlp"].example(batch=8), targets("resmlp", 8)
    m = compile_case("resmlp", 4)
    assert m.config.local_head_weight == 0 and not len(m.heads)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with predicted_weights(m, opt, default_lead(m)):
            m.training_step(*x, target=y)
        assert m.predicted_lead == 0
        compile_case("resmlp", 4, local_head_weight=None).training_step(*x, target=y)
    with pytest.warns(UserWarning, match="without weight prediction and without local heads") as caught:
        m.training_step(*x, target=y)
        m.training_step(*x, target=y)
    assert len([w for w in caught if "weight prediction" in str(w.message)]) == 1
