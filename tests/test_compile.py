"""Differential tests: the compiled chain of blocks against the eager model, over the whole zoo."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import ZOO, Case
from torch.testing import assert_close

import hbll_compile as hc

CASES = [(name, n) for name, case in ZOO.items() for n in case.blocks]
TOL = 1e-5


@pytest.mark.parametrize(("name", "n"), CASES, ids=[f"{c}-N{n}" for c, n in CASES])
def test_blocks_reproduce_model(name: str, n: int) -> None:
    case: Case = ZOO[name]
    model = case.build()
    reference = copy.deepcopy(model)
    m = hc.hbll_compile(model, case.example(), blocks=n)

    assert len(m.blocks) == n
    assert m.tree.depth == (math.ceil(math.log2(n)) if n > 1 else 0)
    assert m.to_original() is model
    assert {id(p) for b in m.blocks for p in b.parameters()} == {id(p) for p in model.parameters()}

    x = case.example(batch=5, seed=3)  # another batch size than the example: the batch dim is dynamic
    m.eval(), reference.eval()
    with torch.no_grad():
        assert_close(m(*x), reference(*x), rtol=0, atol=TOL)

    # train mode: same dropout stream, same BatchNorm statistics, same gradients
    m.train(), reference.train()
    torch.manual_seed(7)
    out = m(*x)
    torch.manual_seed(7)
    expected = reference(*x)
    assert_close(out, expected, rtol=0, atol=TOL)
    out.square().mean().backward()
    expected.square().mean().backward()
    for (pname, p), q in zip(model.named_parameters(), reference.parameters()):
        assert (p.grad is None) == (q.grad is None), pname
        if p.grad is not None:
            assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4, msg=pname)
    for (bname, b), c in zip(model.named_buffers(), reference.buffers()):
        assert_close(b.float(), c.float(), rtol=0, atol=TOL, msg=bname)


@pytest.mark.parametrize("name", list(ZOO), ids=list(ZOO))
def test_output_tail_is_the_end_of_block_n(name: str) -> None:
    """The tail (what sink couplers run) is a suffix of block N and, fed the value crossing its cut,
    gives block N's output."""
    case: Case = ZOO[name]
    n = max(case.blocks)
    m = hc.hbll_compile(case.build(), case.example(), blocks=n).eval()
    tail = m.tail_info
    assert m.specs[-1].nodes[-len(tail.spec.nodes):] == tail.spec.nodes
    assert tail.spec.flops <= m.specs[-1].flops
    x = case.example(batch=3, seed=1)
    env = m.environment(*x)
    h = x[0]
    for i in range(1, n):
        h = m.run_block(i, h, env)
    seen: dict[str, torch.Tensor] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node: torch.fx.Node) -> object:
            seen[node.name] = out = super().run_node(node)
            return out

    with torch.no_grad():
        expected = Recorder(m.blocks[-1]).run(h, *(env[c] for c in m.specs[-1].context))
        t = h if tail.is_whole_block else seen[tail.input.node]
        assert tuple(t.shape[1:]) == tail.input.shape
        assert_close(m.run_tail(t, env), expected, rtol=0, atol=TOL)
    for plan in m.coupler_plans:
        assert plan.runs_tail == (plan.span[1] == n)


def test_tail_of_a_residual_mlp_is_its_head_or_the_whole_block() -> None:
    model, n = ZOO["resmlp"].build(), max(ZOO["resmlp"].blocks)
    m = hc.hbll_compile(model, ZOO["resmlp"].example(), blocks=n)
    assert not m.tail_info.is_whole_block
    assert m.tail_info.spec.param_count == sum(p.numel() for p in model.head.parameters())
    whole = hc.hbll_compile(model, ZOO["resmlp"].example(), blocks=n, config=hc.HBLLConfig(output_tail="block"))
    assert whole.tail is whole.blocks[-1] and whole.tail_info.is_whole_block
    assert [p.sink for p in whole.coupler_plans if p.runs_tail] == [n - 1] * whole.tree.depth


@pytest.mark.parametrize(("tail", "ln_f", "whole_block"), [("auto", True, False), ("head", False, False),
                                                          ("block", True, True)])
def test_a_sequence_tail_keeps_the_final_norm_and_leaves_attention_to_couplers(
    tail: str, ln_f: bool, whole_block: bool
) -> None:
    model = ZOO["gpt"].build()
    m = hc.hbll_compile(model, ZOO["gpt"].example(), blocks=4, config=hc.HBLLConfig(output_tail=tail))
    owned = {id(p) for p in m.tail.parameters()}
    assert m.tail_info.is_whole_block == whole_block
    assert all(id(p) in owned for p in model.ln_f.parameters()) == ln_f
    assert any(id(p) in owned for p in model.h[-1].attn.parameters()) == whole_block


def test_tied_weights_stay_tied() -> None:
    model = ZOO["gpt"].build()
    m = hc.hbll_compile(model, ZOO["gpt"].example(), blocks=4)
    first = m.blocks[0].get_parameter("wte.weight") if hasattr(m.blocks[0], "wte") else None
    shared = [p for b in m.blocks for name, p in b.named_parameters() if p is model.wte.weight]
    assert len(shared) >= 2, "the embedding and the tied output head must be the same Parameter in two blocks"
    assert first is None or first is model.wte.weight
    with torch.no_grad():
        model.wte.weight.add_(1.0)
    m.eval(), model.eval()
    x = ZOO["gpt"].example()
    assert_close(m(*x), model(*x), rtol=0, atol=0)


def test_state_dict_round_trip_and_dtype_conversion() -> None:
    case = ZOO["resnet"]
    m = hc.hbll_compile(case.build(seed=0), case.example(), blocks=4)
    other = hc.hbll_compile(case.build(seed=1), case.example(), blocks=4)
    x = case.example(batch=3)
    m.train()
    m(*x)  # move BatchNorm statistics away from their initial values
    other.load_state_dict(m.state_dict())
    m.eval(), other.eval()
    assert torch.equal(m(*x), other(*x))
    for b, c in zip(m.to_original().buffers(), other.to_original().buffers()):
        assert torch.equal(b, c)

    m.double()
    original = m.to_original()
    assert all(p.dtype == torch.float64 for p in original.parameters())
    assert all(b.dtype == torch.float64 for b in original.buffers() if b.is_floating_point())
    xd = tuple(t.double() for t in x)
    assert_close(m(*xd), original(*xd), rtol=0, atol=1e-10)


def test_train_eval_switch_reaches_original_modules() -> None:
    case = ZOO["cnn_bn"]
    model = case.build()
    m = hc.hbll_compile(model, case.example(), blocks=4)
    m.eval()
    assert not model.training and all(not mod.training for mod in model.modules())
    m.train()
    assert all(mod.training for mod in model.modules())


def test_describe_lists_every_block() -> None:
    case = ZOO["resnet"]
    m = hc.hbll_compile(case.build(), case.example(), blocks=4)
    table = m.describe()
    for column in ("block", "span", "FLOPs", "params", "boundary", "tree level"):
        assert column in table
    rows = [line for line in table.splitlines() if line.startswith("│")]
    assert len(rows) == 4
    assert "B×" in rows[0]


def test_automatic_block_count_is_documented_rule() -> None:
    case = ZOO["resmlp"]
    m = hc.hbll_compile(case.build(), case.example())
    assert len(m.blocks) == 8  # min(8, max_blocks=10), every block above a quarter of its share
    small = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    assert len(hc.hbll_compile(small, (torch.randn(2, 4),)).blocks) == 2  # two pieces with parameters
    resnet = ZOO["resnet"]  # 8 blocks allowed, but at 8 the head is a block of its own: 4
    assert len(hc.hbll_compile(resnet.build(), resnet.example()).blocks) == 4


@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "resnet", "inception"])
def test_fx_fallback_when_export_fails(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from hbll_compile.passes import capture as capture_pass

    def refuse(*_: object) -> None:
        raise RuntimeError("export unavailable")

    monkeypatch.setattr(capture_pass, "_export", refuse)
    case = ZOO[name]
    model = case.build()
    m = hc.hbll_compile(model, case.example(), blocks=2)
    assert m.report.capture == "fx"
    m.eval()
    x = case.example(batch=3)
    assert_close(m(*x), model(*x), rtol=0, atol=TOL)


@pytest.mark.parametrize("name", ["cnn_bn", "resnet"])
def test_no_cut_separates_a_batchnorm_from_its_input(name: str) -> None:
    case = ZOO[name]
    model = case.build()
    with pytest.raises(hc.CutError) as info:
        hc.hbll_compile(model, case.example(), blocks=1000)
    m = hc.hbll_compile(model, case.example(), blocks=info.value.max_blocks)
    for block in list(m.blocks)[1:]:
        (h,) = [n for n in block.graph.nodes if n.op == "placeholder" and n.name == "h"]
        readers = [block.get_submodule(u.target) for u in h.users if u.op == "call_module"]
        assert not (readers and len(readers) == len(h.users)
                    and all(isinstance(r, torch.nn.modules.batchnorm._BatchNorm) for r in readers))


@pytest.mark.parametrize("name", ["gpt", "masked"])
def test_created_tensors_follow_the_input_device(name: str) -> None:
    """``torch.arange(T, device=x.device)`` must not be frozen to the example's device (``.to("cuda")``)."""
    case = ZOO[name]
    m = hc.hbll_compile(case.build(), case.example(), blocks=2)
    for module in (m.context, *m.blocks):
        for node in module.graph.nodes:
            assert not isinstance(node.kwargs.get("device"), torch.device), (node.name, node.kwargs)


def test_local_heads_none_by_default_and_only_where_a_head_fits_under_none() -> None:
    """The default builds no heads. Under ``local_head_weight=None`` a per-sample scalar output has no local
    head, so those blocks train on the path loss alone; an explicit weight asks for heads everywhere and
    is refused."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Tanh(),
                              torch.nn.Linear(8, 1), torch.nn.Flatten(0))
    x = torch.randn(6, 4)
    m = hc.hbll_compile(net, (x[:2],), blocks=3, loss=torch.nn.functional.mse_loss,
                        config=hc.HBLLConfig(local_head_weight=None))
    assert len(m.heads) == 0 and not any(t.head for t in m.schedule.tasks())
    m.training_step(x, target=torch.randn(6))
    with pytest.raises(hc.LoweringError, match="cannot build a local head at boundary 1"):
        hc.hbll_compile(net, (x[:2],), blocks=3, loss=torch.nn.functional.mse_loss,
                        config=hc.HBLLConfig(local_head_weight=0.5))
    example = ZOO["resmlp"].example(2)
    classifier = hc.hbll_compile(ZOO["resmlp"].build(), example, blocks=4,
                                 config=hc.HBLLConfig(local_head_weight=None))
    assert sorted(classifier.heads) == ["1", "2", "3"] and classifier.config.head_weight == 0.5
    default = hc.hbll_compile(ZOO["resmlp"].build(), example, blocks=4)
    assert len(default.heads) == 0 and default.config.head_weight == 0
