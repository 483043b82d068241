"""Property tests for hbll_compile.nn: shape adapters, couplers and local heads."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hbll_compile.nn import (
    AdditiveCoupling,
    AvgPool,
    ChannelResize,
    Compose,
    Coupler,
    Flatten,
    LabelEmbedding,
    SpaceToDepth,
    make_adapter,
    make_head,
)

FAST = settings(max_examples=25, deadline=None)
BATCH = 3

sizes = st.integers(1, 6)
vectors = st.tuples(st.integers(1, 12))
sequences = st.tuples(st.integers(1, 5), st.integers(1, 12))
images = st.tuples(sizes, st.integers(1, 5), st.integers(1, 5))


@st.composite
def adapter_pairs(draw: st.DrawFn) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A supported (in_shape, out_shape) pair of every kind make_adapter handles."""
    kind = draw(st.sampled_from(["same", "down", "up", "channels", "sequence", "vector", "to_vector"]))
    c, c2, f = draw(sizes), draw(sizes), draw(st.integers(1, 3))
    h, w = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    if kind == "same":
        shape = draw(st.one_of(vectors, sequences, images))
        return shape, shape
    if kind == "down":
        return (c, h * f, w * f), (c2, h, w)
    if kind == "up":
        return (c, h, w), (c2, h * f, w * f)
    if kind == "channels":
        return (c, h, w), (c2, h, w)
    if kind == "sequence":
        t, d = draw(sequences)
        return (t, d), (t, draw(st.integers(1, 12)))
    if kind == "vector":
        return draw(vectors), draw(vectors)
    return draw(st.one_of(sequences, images)), (draw(st.integers(1, 40)),)


def randomize(module: torch.nn.Module) -> None:
    """Move every parameter away from its (partly zero) init so couplings are not identities."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.2)


@FAST
@given(adapter_pairs(), st.integers(0, 2**31 - 1))
def test_adapter_shapes_and_inverses(pair, seed):
    in_shape, out_shape = pair
    adapter = make_adapter(in_shape, out_shape)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, *in_shape, generator=gen)
    y = adapter(x)
    assert adapter.in_shape == in_shape and adapter.out_shape == out_shape
    assert tuple(y.shape) == (BATCH, *out_shape)
    assert adapter.bijective == (adapter.injective and adapter.surjective)
    if adapter.injective:
        torch.testing.assert_close(adapter.inverse(y), x, atol=1e-5, rtol=0)
    if adapter.surjective:
        target = torch.randn(BATCH, *out_shape, generator=gen)
        torch.testing.assert_close(adapter(adapter.inverse(target)), target, atol=1e-5, rtol=0)


@FAST
@given(images, st.integers(1, 40))
def test_image_to_vector_is_injective_exactly_when_it_fits(shape, dim):
    adapter = make_adapter(shape, (dim,))
    assert adapter.injective == (math.prod(shape) <= dim)
    x = torch.randn(BATCH, *shape)
    # pooling keeps every channel's mean when the channels fit: (C,) is recoverable from the output
    if shape[0] <= dim:
        means = x.mean(dim=(2, 3))
        recovered = adapter.inverse(adapter(x)).mean(dim=(2, 3))
        torch.testing.assert_close(recovered, means, atol=1e-5, rtol=1e-5)


@FAST
@given(st.one_of(sequences, images), st.data())
def test_avg_pool_averages_windows_and_repeats_back(shape, data):
    axes = range(1, 3) if len(shape) == 3 else range(1)
    kernel = [data.draw(st.sampled_from([k for k in range(1, shape[a] + 1) if shape[a] % k == 0])) for a in axes]
    pool = AvgPool(shape, kernel)
    x = torch.randn(BATCH, *shape)
    y = pool(x)
    torch.testing.assert_close(y.mean(), x.mean(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pool(pool.inverse(y)), y, atol=1e-6, rtol=0)
    assert pool.injective == all(k == 1 for k in kernel)


def test_non_injective_adapters_lose_information():
    x = torch.randn(2, 4, 6)
    crop = ChannelResize((4, 6), 3)
    assert not crop.injective and crop.surjective
    assert not torch.allclose(crop.inverse(crop(x)), x)
    pool = AvgPool((4, 6), (2,))
    assert not pool.injective and pool.out_shape == (2, 6)
    assert not torch.allclose(pool.inverse(pool(x)), x)


def test_compose_rejects_mismatched_parts():
    with pytest.raises(ValueError, match=r"\(12, 4, 4\).*\(3, 4, 4\)"):
        Compose(SpaceToDepth((3, 8, 8), 2), Flatten((3, 4, 4)))


@FAST
@given(adapter_pairs(), st.integers(1, 8), st.integers(0, 3), st.integers(0, 2**31 - 1), st.sampled_from([1.0, 4.0]))
def test_coupler_inverse_and_shape(pair, hidden, n_layers, seed, gain):
    in_shape, out_shape = pair
    torch.manual_seed(seed)
    coupler = Coupler(in_shape, out_shape, hidden, n_layers, gain)
    randomize(coupler)
    coupler.double()  # exact up to float64 roundoff: float32's grows with the layers' gain and width
    x = torch.randn(BATCH, *in_shape, dtype=torch.float64)
    y = coupler(x)
    assert tuple(y.shape) == (BATCH, *out_shape)
    if n_layers:
        assert not torch.allclose(y, coupler.adapter(x)), "randomized couplings should change the output"
    if coupler.injective:
        torch.testing.assert_close(coupler.inverse(y), x, atol=1e-10, rtol=0)
    if coupler.adapter.surjective:
        target = torch.randn(BATCH, *out_shape, dtype=torch.float64)
        torch.testing.assert_close(coupler(coupler.inverse(target)), target, atol=1e-10, rtol=0)


def condition(shape: tuple[int, ...], cond_dim: int, per_token: bool, gen: torch.Generator) -> torch.Tensor:
    """A condition for a batch of ``shape``: one vector per sample, or per token for a sequence."""
    tokens = (shape[0],) if per_token and len(shape) == 2 else ()
    return torch.randn(BATCH, *tokens, cond_dim, generator=gen)


@FAST
@given(adapter_pairs(), st.integers(1, 8), st.integers(1, 3), st.integers(1, 5), st.booleans(),
       st.integers(0, 2**31 - 1))
def test_conditioned_coupler_is_invertible_for_each_fixed_condition(pair, hidden, n_layers, cond_dim, per_token, seed):
    in_shape, out_shape = pair
    torch.manual_seed(seed)
    coupler = Coupler(in_shape, out_shape, hidden, n_layers, gain=4.0, cond_dim=cond_dim)
    randomize(coupler)
    coupler.double()  # exact up to float64 roundoff
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, *in_shape, generator=gen, dtype=torch.float64)
    cond, other = (condition(coupler.space, cond_dim, per_token, gen).double() for _ in range(2))
    y = coupler(x, cond)
    assert tuple(y.shape) == (BATCH, *out_shape)
    assert not torch.allclose(y, coupler(x, other)), "the condition should change the output"
    if coupler.injective:
        torch.testing.assert_close(coupler.inverse(y, cond), x, atol=1e-10, rtol=0)
    if coupler.adapter.surjective:
        target = torch.randn(BATCH, *out_shape, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(coupler(coupler.inverse(target, cond), cond), target, atol=1e-10, rtol=0)


@FAST
@given(st.one_of(vectors, sequences, images), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_fresh_condition_projection_changes_nothing(shape, cond_dim, seed):
    """A conditioned coupler with trained F, G nets but a fresh (zero) projection equals the plain one."""
    torch.manual_seed(seed)
    plain = Coupler(shape, shape, hidden=5)
    conditioned = Coupler(shape, shape, hidden=5, cond_dim=cond_dim)
    randomize(plain)
    missing, unexpected = conditioned.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(name.endswith("cond") for name in missing)
    x = torch.randn(BATCH, *shape)
    cond = torch.randn(BATCH, cond_dim)
    torch.testing.assert_close(conditioned(x, cond), plain(x), rtol=0, atol=0)


def test_condition_one_vector_broadcasts_over_the_batch():
    torch.manual_seed(0)
    coupler = Coupler((3, 4, 4), (12, 2, 2), hidden=4, cond_dim=2)
    randomize(coupler)
    x, cond = torch.randn(BATCH, 3, 4, 4), torch.randn(1, 2)
    torch.testing.assert_close(coupler(x, cond), coupler(x, cond.expand(BATCH, 2)))


@FAST
@given(st.one_of(vectors, sequences, images), st.integers(1, 8), st.integers(1, 3), st.integers(1, 4),
       st.integers(1, 5))
def test_flops_count_the_condition_projection(shape, hidden, n_layers, batch, cond_dim):
    d = shape[0] if len(shape) == 3 else shape[-1]
    plain, conditioned = Coupler(shape, shape, hidden, n_layers), Coupler(shape, shape, hidden, n_layers,
                                                                           cond_dim=cond_dim)
    per_layer = 2 * cond_dim * (1 if d == 1 else 2 * hidden)  # F and G each project cond to `hidden`
    assert conditioned.flops(batch) == plain.flops(batch) + n_layers * batch * per_layer


def test_wrong_conditions_raise():
    coupler = Coupler((5, 4), (5, 4), hidden=4, cond_dim=3)
    x = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="cond_dim=3 but got cond=None"):
        coupler(x)
    with pytest.raises(ValueError, match=r"\(B, 3\) or \(B, 5, 3\).*\(2, 4\)"):
        coupler(x, torch.randn(2, 4))
    with pytest.raises(ValueError, match="floating-point"):
        coupler(x, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="cond_dim=0 but got cond=a tensor"):
        Coupler((4,), (4,), hidden=4)(torch.randn(2, 4), torch.randn(2, 3))
    with pytest.raises(ValueError, match="encoder needs cond_dim > 0"):
        Coupler((4,), (4,), hidden=4, encoder=torch.nn.Identity())


@FAST
@given(st.integers(2, 12), st.integers(2, 9), st.integers(2, 12), st.integers(1, 3),
       st.sampled_from(["causal_conv", "causal_attention"]), st.integers(0, 2**31 - 1))
def test_causal_token_mixing_is_causal_mixes_and_is_invertible(t, d, d_out, n_layers, mixing, seed):
    torch.manual_seed(seed)
    coupler = Coupler((t, d), (t, d_out), hidden=6, n_layers=n_layers, mixing=mixing, cond_dim=2)
    randomize(coupler)
    x, cond = torch.randn(BATCH, t, d), torch.randn(BATCH, t, 2)
    y = coupler(x, cond)
    for s in range(t - 1):  # perturbing token s + 1 (input and condition) leaves every output up to s unchanged
        x2, cond2 = x.clone(), cond.clone()
        x2[:, s + 1] += torch.randn(BATCH, d)
        cond2[:, s + 1] += 1.0
        y2 = coupler(x2, cond2)
        torch.testing.assert_close(y2[:, : s + 1], y[:, : s + 1], rtol=0, atol=0)
    x3 = x.clone()
    x3[:, 0] += 1.0
    assert not torch.allclose(coupler(x3, cond)[:, 1], y[:, 1]), "token 1 should read token 0"
    if coupler.injective:
        torch.testing.assert_close(coupler.inverse(y, cond), x, atol=1e-5, rtol=0)
    if coupler.adapter.surjective:
        target = torch.randn(BATCH, t, d_out)
        torch.testing.assert_close(coupler(coupler.inverse(target, cond), cond), target, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mixing", ["causal_conv", "causal_attention"])
def test_token_mixing_leaves_vectors_and_images_alone(mixing):
    for shape in ((6,), (3, 4, 4)):
        plain, mixed = Coupler(shape, shape, hidden=4), Coupler(shape, shape, hidden=4, mixing=mixing)
        assert mixed.state_dict().keys() == plain.state_dict().keys()


@pytest.mark.parametrize(("mixing", "per_net"), [
    ("causal_conv", lambda t, h: 2 * t * h * 8),  # CAUSAL_KERNEL taps per hidden feature and token
    ("causal_attention", lambda t, h: 2 * t * h * 32 + 2 * t * t * 16 + 2 * t * t * h),  # q, k; q k^T; weights v
])
def test_token_mixing_flops_are_counted(mixing, per_net):
    t, d, hidden, n_layers = 10, 6, 5, 2
    plain, mixed = Coupler((t, d), (t, d), hidden, n_layers), Coupler((t, d), (t, d), hidden, n_layers, mixing=mixing)
    assert mixed.flops() == plain.flops() + n_layers * 2 * per_net(t, hidden)


def test_label_embedding_has_a_no_label_vector_that_dropout_trains():
    torch.manual_seed(0)
    embed = LabelEmbedding(5, 3, dropout=0.5)
    labels = torch.tensor([0, 4, -100, 2])
    embed.eval()
    out = embed(labels)
    torch.testing.assert_close(out[2], embed.table.weight[5])
    torch.testing.assert_close(out[[0, 1, 3]], embed.table.weight[[0, 4, 2]])
    torch.testing.assert_close(embed(None), embed.table.weight[5:])
    assert embed(torch.zeros(2, 7, dtype=torch.long)).shape == (2, 7, 3)
    embed.train()
    dropped = embed(torch.zeros(1000, dtype=torch.long))
    share = (dropped == embed.table.weight[5]).all(dim=1).float().mean().item()
    assert 0.4 < share < 0.6, share  # half the labels replaced by "no label"


@FAST
@given(st.one_of(vectors, sequences, images), st.integers(1, 16))
def test_fresh_coupler_with_identity_adapter_is_identity(shape, hidden):
    coupler = Coupler(shape, shape, hidden)
    assert coupler.bijective
    x = torch.randn(BATCH, *shape)
    torch.testing.assert_close(coupler(x), x, rtol=0, atol=1e-6)


def test_gain_scales_the_residual_update():
    torch.manual_seed(0)
    plain, scaled = AdditiveCoupling((6,), hidden=4), AdditiveCoupling((6,), hidden=4, gain=3.0)
    randomize(plain)
    scaled.load_state_dict(plain.state_dict())
    x = torch.randn(BATCH, 6)
    torch.testing.assert_close((scaled(x) - x)[:, :3], 3.0 * (plain(x) - x)[:, :3])
    torch.testing.assert_close(scaled.inverse(scaled(x)), x, atol=1e-5, rtol=0)


def test_feature_size_one_coupling_is_a_learned_offset():
    layer = AdditiveCoupling((5, 1), hidden=4)
    with torch.no_grad():
        layer.offset.fill_(0.5)
    x = torch.randn(2, 5, 1)
    torch.testing.assert_close(layer(x), x + 0.5)
    torch.testing.assert_close(layer.inverse(layer(x)), x)
    assert Coupler.for_budget((5, 1), (5, 1), flop_budget=10**6, min_hidden=4).hidden == 4


@FAST
@given(st.one_of(vectors, sequences, images), st.integers(1, 8), st.integers(1, 3), st.integers(1, 4))
def test_flops_count_every_multiply_add(shape, hidden, n_layers, batch):
    d = shape[0] if len(shape) == 3 else shape[-1]
    coupler = Coupler(shape, shape, hidden, n_layers)
    if d == 1:
        expected = 0
    elif len(shape) == 3:  # per pixel: F = 1x1 (d2 -> h) + 3x3 (h -> d1), G the other way round
        expected = n_layers * batch * shape[1] * shape[2] * 2 * hidden * (d + 9 * d)
    else:  # per position: F and G are Linear pairs, 2 * hidden * d flops each
        expected = n_layers * batch * math.prod(shape[:-1]) * 4 * hidden * d
    assert coupler.flops(batch) == expected


@FAST
@given(adapter_pairs(), st.integers(0, 200_000), st.integers(1, 3))
def test_for_budget_is_the_largest_hidden_within_budget(pair, budget, n_layers):
    in_shape, out_shape = pair
    coupler = Coupler.for_budget(in_shape, out_shape, budget, n_layers=n_layers, min_hidden=2)
    assert coupler.out_shape == out_shape and len(coupler.layers) == n_layers
    if Coupler(in_shape, out_shape, 2, n_layers).flops() > budget:
        assert coupler.hidden == 2
        return
    assert coupler.flops() <= budget
    if Coupler(in_shape, out_shape, 3, n_layers).flops() > Coupler(in_shape, out_shape, 2, n_layers).flops():
        assert Coupler(in_shape, out_shape, coupler.hidden + 1, n_layers).flops() > budget
    bigger = Coupler.for_budget(in_shape, out_shape, 2 * budget, n_layers=n_layers, min_hidden=2)
    assert bigger.hidden >= coupler.hidden


def test_for_budget_grows_hidden_with_budget():
    hiddens = [Coupler.for_budget((3, 8, 8), (12, 4, 4), b).hidden for b in (10**5, 10**6, 10**7)]
    assert hiddens[0] < hiddens[1] < hiddens[2]
    assert Coupler.for_budget((64,), (64,), flop_budget=20_000).hidden == 39  # 2 layers * 4 * 64 * 39


@st.composite
def head_pairs(draw: st.DrawFn) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A supported (boundary_shape, output_shape) pair for make_head."""
    k = draw(st.integers(1, 12))
    kind = draw(st.sampled_from(["image_class", "image_image", "tokens", "sequence_class", "vector"]))
    if kind == "image_class":
        return draw(images), (k,)
    if kind == "image_image":
        return draw(images), (k, draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    if kind == "tokens":
        t, d = draw(sequences)
        return (t, d), (t, k)
    if kind == "sequence_class":
        return draw(sequences), (k,)
    return draw(vectors), (k,)


@FAST
@given(head_pairs())
def test_heads_give_the_output_shape(pair):
    boundary, output = pair
    head = make_head(boundary, output)
    out = head(torch.randn(BATCH, *boundary))
    assert tuple(out.shape) == (BATCH, *output)
    out.sum().backward()
    assert all(p.grad is not None for p in head.parameters())


@pytest.mark.parametrize(
    ("in_shape", "out_shape"),
    [
        ((4,), (2, 3, 3)),  # vector -> image
        ((3, 8, 8), (5, 10)),  # image -> sequence
        ((5, 4), (6, 4)),  # sequence length changes
        ((3, 8, 8), (3, 4, 2)),  # H and W scale differently
        ((3, 6, 6), (3, 4, 4)),  # non-integer scale
        ((3, 4, 4), (3, 8, 4)),  # upsampling H only
    ],
)
def test_other_shape_pairs_go_through_a_vector(in_shape, out_shape):
    adapter = make_adapter(in_shape, out_shape)
    x = torch.randn(2, *in_shape)
    assert adapter(x).shape == (2, *out_shape)
    assert adapter.injective == (math.prod(in_shape) <= math.prod(out_shape))
    if adapter.injective:
        assert torch.equal(adapter.inverse(adapter(x)), x)
    assert Coupler(in_shape, out_shape, hidden=4)(x).shape == (2, *out_shape)


@pytest.mark.parametrize("bad", [(), (0,), (3, 0), (1, 2, 3, 4), (2, -1, 3)])
def test_invalid_shapes_raise(bad):
    with pytest.raises(ValueError, match="per-sample"):
        make_adapter(bad, (3,))


@pytest.mark.parametrize(
    ("boundary", "output"),
    [((4,), (2, 3, 3)), ((5, 4), (2, 3, 3)), ((5, 4), (6, 4)), ((3, 8, 8), (5, 10)), ((4,), (5, 4))],
)
def test_unsupported_heads_raise_naming_both_shapes(boundary, output):
    with pytest.raises(ValueError) as info:
        make_head(boundary, output)
    assert str(boundary) in str(info.value) and str(output) in str(info.value)


def test_wrong_inputs_raise():
    coupler = Coupler((3, 8, 8), (12, 4, 4), hidden=4)
    with pytest.raises(ValueError, match=r"\(B, \*\(3, 8, 8\)\).*\(2, 3, 4, 4\)"):
        coupler(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="floating-point"):
        coupler(torch.zeros(2, 3, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="inverse"):
        coupler.inverse(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError):
        Coupler((4,), (4,), hidden=4, n_layers=-1)
    with pytest.raises(ValueError):
        Coupler.for_budget((4,), (4,), flop_budget=-1)


def test_downsampling_coupler_couples_on_the_space_to_depth_output_and_fits_a_strided_conv():
    """Each pixel phase is its own channel there, so the coupler can fit a strided convolution (the
    projection shortcut of a ResNet stage), which coupling on the full-resolution input cannot: its
    convolutions compute one function for all four phases."""
    coupler = Coupler((8, 8, 8), (16, 4, 4), hidden=48)
    assert isinstance(coupler.lead, SpaceToDepth) and coupler.space == (32, 4, 4)
    assert isinstance(coupler.rest, ChannelResize) and not coupler.injective
    full_resolution = nn.Sequential(Coupler((8, 8, 8), (8, 8, 8), hidden=48), make_adapter((8, 8, 8), (16, 4, 4)))
    torch.manual_seed(0)
    x = torch.randn(64, 8, 8, 8)
    with torch.no_grad():
        y = nn.Conv2d(8, 16, 2, stride=2)(x)
    errors = []
    for model in (coupler, full_resolution):
        torch.manual_seed(1)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(150):
            loss = F.mse_loss(model(x), y) / y.var()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        errors.append(loss.item())
    assert errors[0] < 0.5 * errors[1], errors
