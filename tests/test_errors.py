"""Refusals: every one is a CompileError that names the node, the reason and a remedy."""

from __future__ import annotations

import pytest
import torch
from helpers import ZOO, DataDependent, TupleOutput

import hbll_compile as hc


def test_data_dependent_control_flow_is_refused_with_source_line() -> None:
    with pytest.raises(hc.CaptureError) as info:
        hc.hbll_compile(DataDependent(), (torch.randn(3, 4),), blocks=2)
    err = info.value
    assert isinstance(err, hc.CompileError)
    assert "data-dependent" in err.reason
    assert err.node is not None and "helpers.py" in err.node and "if h.sum() > 0" in err.node
    assert "torch.cond" in err.remedy


def test_too_many_blocks_states_the_maximum() -> None:
    case = ZOO["resnet"]
    with pytest.raises(hc.CutError) as info:
        hc.hbll_compile(case.build(), case.example(), blocks=100)
    most = info.value.max_blocks
    assert most == 8 and f"at most {most} blocks" in str(info.value)
    assert f"blocks <= {most}" in info.value.remedy


def test_non_tensor_output_is_refused() -> None:
    with pytest.raises(hc.CaptureError, match="exactly one tensor output") as info:
        hc.hbll_compile(TupleOutput(), (torch.randn(3, 4),), blocks=2)
    assert "wrap the model" in info.value.remedy


def test_dict_output_is_refused() -> None:
    class DictOut(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": self.a(x)}

    with pytest.raises(hc.CaptureError, match="dict"):
        hc.hbll_compile(DictOut(), (torch.randn(3, 4),), blocks=1)


def test_non_tensor_example_input_is_refused() -> None:
    with pytest.raises(hc.CaptureError, match="not a tensor"):
        hc.hbll_compile(torch.nn.Linear(4, 4), (torch.randn(3, 4), "x"), blocks=1)


def test_functional_dropout_with_frozen_training_flag_is_refused() -> None:
    class FunctionalDropout(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.dropout(self.a(x), 0.3, self.training)

    with pytest.raises(hc.CaptureError, match="training=True") as info:
        hc.hbll_compile(FunctionalDropout(), (torch.randn(3, 4),), blocks=1)
    assert "nn.Dropout" in info.value.remedy


def test_parameter_free_model_is_refused() -> None:
    class NoParams(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    with pytest.raises(hc.CutError, match="nothing to train"):
        hc.hbll_compile(NoParams(), (torch.randn(3, 4),))


def test_zero_blocks_is_refused() -> None:
    with pytest.raises(hc.CutError, match="at least 1"):
        hc.hbll_compile(torch.nn.Linear(4, 4), (torch.randn(3, 4),), blocks=0)


def test_attention_dropout_traced_in_train_mode_is_refused() -> None:
    class AttentionDropout(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = torch.nn.Linear(8, 24)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q, k, v = self.qkv(x).split(8, dim=-1)
            p = 0.1 if self.training else 0.0
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)

    with pytest.raises(hc.CaptureError, match="training=True") as info:
        hc.hbll_compile(AttentionDropout(), (torch.randn(3, 5, 8),), blocks=1)
    assert "attention" in info.value.remedy


@pytest.mark.parametrize("examples", [None, {"x": torch.randn(3, 4)}, 3.0])
def test_example_inputs_that_are_not_a_tensor_or_tuple_are_refused(examples: object) -> None:
    with pytest.raises(hc.CaptureError, match="example_inputs is a") as info:
        hc.hbll_compile(torch.nn.Linear(4, 4), examples, blocks=1)
    assert info.value.node == "example_inputs"


@pytest.mark.parametrize("argument, value", [("loss", "cross_entropy"), ("config", {"objective": "bp"})])
def test_loss_and_config_of_the_wrong_type_are_refused(argument: str, value: object) -> None:
    with pytest.raises(hc.CompileError) as info:
        hc.hbll_compile(torch.nn.Linear(4, 4), (torch.randn(3, 4),), blocks=1, **{argument: value})
    assert info.value.node == argument
