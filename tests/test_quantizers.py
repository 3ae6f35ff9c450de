"""Specs, fake-quant arithmetic and range estimators against direct NumPy references."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from outlierfx.errors import DataError
from outlierfx.graph.roles import Role
from outlierfx.quantizers.fake_quant import (
    fake_quantize,
    group_index,
    qparams_from_range,
    quantize_weight,
    range_balanced_sizes,
)
from outlierfx.quantizers.observers import FakeQuantize, Observer, token_mask
from outlierfx.quantizers.spec import Estimator, Granularity, QuantSpec, weight_spec


def np_fake_quant(x, lo, hi, bits, symmetric):
    """Reference: the textbook formulas, in float64 NumPy, round-half-to-even."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        scale = max(max(-lo, hi) / qmax, 1e-8)
        zp = 0
    else:
        qmin, qmax = 0, 2**bits - 1
        scale = max((hi - lo) / (qmax - qmin), 1e-8)
        zp = int(np.clip(qmin - np.round(lo / scale), qmin, qmax))
    q = np.clip(np.round(x / scale) + zp, qmin, qmax)
    return (q - zp) * scale, scale


finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@settings(max_examples=200)
@given(x=arrays(np.float32, st.integers(1, 64), elements=finite), bits=st.integers(2, 16), symmetric=st.booleans())
def test_fake_quant_matches_numpy(x, bits, symmetric):
    spec = QuantSpec(bits=bits, symmetric=symmetric)
    t = torch.from_numpy(x)
    scale, zp = qparams_from_range(t.min(), t.max(), spec)
    ours = fake_quantize(t, scale, zp, spec).numpy().astype(np.float64)
    ref, ref_scale = np_fake_quant(x.astype(np.float64), float(x.min()), float(x.max()), bits, symmetric)
    assert np.isclose(float(scale), ref_scale, rtol=1e-6)
    # float32 division can flip a tie; allow one grid step on at most the rare tie
    diff = np.abs(ours - ref)
    assert np.all(diff <= ref_scale * 1.0001)
    flipped = diff > 1e-5 * np.maximum(np.abs(ref), ref_scale)
    assert np.mean(flipped) <= 0.05 + 1 / len(x)
    # min-max range: nothing is clipped, so the error is at most half a step (+ fp slack)
    assert np.all(np.abs(ours - x) <= ref_scale * 0.5001 + 1e-6 * np.abs(x))


@pytest.mark.parametrize("values", [[0.0] * 5, [3.0] * 5, [-2.0, -1.0, -0.5], [0.1, 0.2, 1000.0, -0.3]])
@pytest.mark.parametrize("bits,symmetric", [(8, False), (8, True), (2, False), (2, True), (16, False)])
def test_edge_cases(values, bits, symmetric):
    spec = QuantSpec(bits=bits, symmetric=symmetric)
    t = torch.tensor(values)
    scale, zp = qparams_from_range(t.min(), t.max(), spec)
    out = fake_quantize(t, scale, zp, spec)
    assert torch.isfinite(out).all() and float(scale) > 0
    assert spec.qmin <= int(zp) <= spec.qmax
    if len(set(values)) == 1:
        assert torch.equal(out, t)  # constant tensors (zero included) are exact
    assert float(fake_quantize(torch.zeros(1), scale, zp, spec)) == 0.0  # zero is always exact
    ref, ref_scale = np_fake_quant(np.array(values, dtype=np.float64), min(values), max(values), bits, symmetric)
    # exact ties (e.g. -1 / (2/255) = -127.5) may round the other way in float32: one step at most
    assert np.all(np.abs(out.numpy() - ref) <= ref_scale * 1.0001)


def test_round_half_to_even():
    spec = QuantSpec(bits=8, symmetric=True)
    out = fake_quantize(torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5]), torch.tensor(1.0), torch.tensor(0), spec)
    assert out.tolist() == [0.0, 2.0, 2.0, -0.0, -2.0]


def test_spec_validation():
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits=1)
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits=17)
    with pytest.raises(ValueError, match="PER_GROUP"):
        QuantSpec(groups=3)
    with pytest.raises(ValueError, match="bijection"):
        QuantSpec(granularity=Granularity.PER_GROUP, groups=2, permutation=(0, 0, 1))
    with pytest.raises(ValueError, match="per-tensor"):
        QuantSpec(granularity=Granularity.PER_CHANNEL, estimator=Estimator.PERCENTILE)
    with pytest.raises(ValueError, match="per tensor only"):  # weights may clip per row; observers cannot
        Observer(QuantSpec(granularity=Granularity.PER_CHANNEL, estimator=Estimator.MSE))
    assert QuantSpec(symmetric=True).signed and not QuantSpec().signed
    assert (QuantSpec(bits=4, symmetric=True).qmin, QuantSpec(bits=4).qmax) == (-8, 15)


def _observe(spec, batches, mask=None):
    obs = Observer(spec)
    for b in batches:
        with token_mask(mask):
            obs(b)
    return obs


batches_strategy = st.lists(arrays(np.float32, (3, 4, 6), elements=finite), min_size=1, max_size=4)


@settings(max_examples=50)
@given(batches=batches_strategy)
def test_minmax_and_per_channel_against_numpy(batches):
    tensors = [torch.from_numpy(b) for b in batches]
    everything = np.stack(batches)
    lo, hi = _observe(QuantSpec(), tensors).range()
    assert float(lo) == everything.min() and float(hi) == everything.max()
    obs = _observe(QuantSpec(granularity=Granularity.PER_CHANNEL, axis=-1), tensors)
    lo, hi = obs.range()
    assert np.array_equal(lo.numpy(), everything.reshape(-1, 6).min(0))
    assert np.array_equal(hi.numpy(), everything.reshape(-1, 6).max(0))


@settings(max_examples=50)
@given(batches=batches_strategy, momentum=st.floats(0.0, 0.99))
def test_running_minmax(batches, momentum):
    lo_ref = hi_ref = None
    for b in batches:
        lo_b, hi_b = float(b.min()), float(b.max())
        if lo_ref is None:
            lo_ref, hi_ref = lo_b, hi_b
        else:
            lo_ref, hi_ref = momentum * lo_ref + (1 - momentum) * lo_b, momentum * hi_ref + (1 - momentum) * hi_b
    spec = QuantSpec(estimator=Estimator.RUNNING_MINMAX, momentum=momentum)
    lo, hi = _observe(spec, [torch.from_numpy(b) for b in batches]).range()
    assert np.isclose(float(lo), lo_ref, rtol=1e-5, atol=1e-3) and np.isclose(float(hi), hi_ref, rtol=1e-5, atol=1e-3)


@settings(max_examples=50)
@given(batches=batches_strategy, p=st.floats(90.0, 100.0))
def test_percentile(batches, p):
    lo, hi = _observe(QuantSpec(estimator=Estimator.PERCENTILE, percentile=p), [torch.from_numpy(b) for b in batches]).range()
    flat = np.concatenate([b.reshape(-1) for b in batches]).astype(np.float64)
    assert np.isclose(float(hi), np.percentile(flat, p), rtol=1e-4, atol=1e-2)
    assert np.isclose(float(lo), np.percentile(flat, 100 - p), rtol=1e-4, atol=1e-2)


def test_mse_range_clips_a_single_outlier_and_beats_minmax():
    torch.manual_seed(0)
    data = torch.randn(4096)
    data[0] = 200.0
    spec = QuantSpec(bits=4, estimator=Estimator.MSE)
    obs = _observe(spec, [data])
    lo, hi = obs.range()
    assert float(hi) < 200.0 and float(lo) >= float(data.min())

    def mse(lo_, hi_):
        s, z = qparams_from_range(lo_, hi_, spec)
        return float((fake_quantize(data, s, z, spec) - data).pow(2).mean())

    assert mse(lo, hi) < mse(data.min(), data.max())


def test_token_quantile_against_numpy():
    torch.manual_seed(0)
    x = torch.randn(2, 10, 8)
    x[0, 3] *= 50  # one outlier token
    spec = QuantSpec(estimator=Estimator.TOKEN_QUANTILE, token_alpha=0.9)
    lo, hi = _observe(spec, [x]).range()
    per_token = x.reshape(-1, 8).numpy()
    assert np.isclose(float(hi), np.quantile(per_token.max(1), 0.9), rtol=1e-5)
    assert np.isclose(float(lo), np.quantile(per_token.min(1), 0.1), rtol=1e-5)
    assert float(hi) < float(x.max())  # the outlier token is clipped


def test_padding_is_excluded():
    x = torch.randn(2, 5, 4)
    x[1, 3:] = 1e6  # padded positions carry garbage
    mask = torch.tensor([[1] * 5, [1, 1, 1, 0, 0]])
    _lo, hi = _observe(QuantSpec(), [x], mask).range()
    assert float(hi) == float(x[mask.bool()].max())
    scores = torch.randn(2, 3, 5, 5)
    scores[1, :, :, 3:] = 1e6  # scores against padded keys
    _lo, hi = _observe(QuantSpec(), [scores], mask).range()
    assert float(hi) < 1e3


def test_a_per_head_context_keeps_every_head_of_the_real_tokens():
    # [batch, heads, seq, head_dim] with as many heads as tokens: axes 0-1 have the mask's shape,
    # but the positions are on axis 2 (masking axes 0-1 dropped heads, not padding)
    context = torch.randn(2, 4, 4, 8)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    context[0, :, 2:] = 1e6  # padded positions
    context[0, 3, 0, 5] = 50.0  # a real token's value in a head that masking axes 0-1 drops
    obs = Observer(QuantSpec(), roles=frozenset({Role.ATTN_CONTEXT}))
    with token_mask(mask):
        obs(context)
    _lo, hi = obs.range()
    assert float(hi) == 50.0


def test_nan_activation_is_named():
    obs = Observer(QuantSpec(), "encoder.layer.0.output")
    with pytest.raises(DataError, match="NaN or inf reached the observer at encoder.layer.0.output"):
        obs(torch.tensor([1.0, float("nan")]))


def test_uncalibrated_observer():
    with pytest.raises(DataError, match="saw no data"):
        Observer(QuantSpec(), "x").qparams()


@settings(max_examples=50)
@given(channels=st.integers(1, 40), groups=st.integers(1, 40), seed=st.integers(0, 1000))
def test_group_index_is_balanced_and_follows_the_permutation(channels, groups, seed):
    groups = min(groups, channels)
    perm = tuple(torch.randperm(channels, generator=torch.Generator().manual_seed(seed)).tolist())
    index = group_index(channels, groups, perm)
    sizes = torch.bincount(index, minlength=groups)
    assert sizes.max() - sizes.min() <= 1 and sizes.min() >= 1
    ordered = index[list(perm)]
    assert torch.all(ordered[1:] >= ordered[:-1])  # contiguous in permuted order


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(3, 8), seed=st.integers(0, 1000), outlier=st.floats(1.0, 50.0))
def test_mse_weight_rows_never_quantize_worse_than_min_max(bits, seed, outlier):
    w = torch.randn(6, 40, generator=torch.Generator().manual_seed(seed))
    w[:, 0] *= outlier  # one heavy column: clipping it can pay off
    minmax, mse = weight_spec(bits), weight_spec(bits).with_(estimator=Estimator.MSE)
    q_minmax, _, _ = quantize_weight(w, minmax)
    q_mse, scale, _ = quantize_weight(w, mse)
    err_minmax = (q_minmax - w).pow(2).sum(1)
    err_mse = (q_mse - w).pow(2).sum(1)
    assert torch.all(err_mse <= err_minmax * (1 + 1e-6) + 1e-12)
    # the clipped rows stay on their grid, and min-max on them gives their scale back
    _, recovered, _ = quantize_weight(q_mse, minmax)
    assert torch.allclose(recovered, scale, rtol=1e-5)


def _noise(sorted_widths, sizes):
    """Summed squared step over channels when each group takes its widest member's range."""
    total, end = 0.0, 0
    for size in sizes:
        end += size
        total += size * float(sorted_widths[end - 1]) ** 2
    return total


def _compositions(n, k):
    if k == 1:
        yield (n,)
        return
    for first in range(1, n - k + 2):
        for rest in _compositions(n - first, k - 1):
            yield (first, *rest)


@settings(max_examples=60, deadline=None)
@given(widths=st.lists(st.floats(0.0, 1e4, allow_nan=False), min_size=1, max_size=9), groups=st.integers(1, 9))
def test_range_sized_groups_are_optimal_and_never_worse_than_equal_ones(widths, groups):
    w = torch.tensor(sorted(widths), dtype=torch.float64)
    groups = min(groups, w.numel())
    sizes = range_balanced_sizes(w, groups)
    assert len(sizes) == groups and sum(sizes) == w.numel() and min(sizes) >= 1
    best = min(_noise(w, c) for c in _compositions(w.numel(), groups))  # exhaustive
    assert _noise(w, sizes) == pytest.approx(best, rel=1e-9, abs=1e-9)
    equal = torch.bincount(group_index(w.numel(), groups, None), minlength=groups).tolist()
    assert _noise(w, sizes) <= _noise(w, equal) * (1 + 1e-12) + 1e-9
    index = group_index(w.numel(), groups, None, sizes)
    assert torch.bincount(index, minlength=groups).tolist() == list(sizes)


def test_range_sized_groups_isolate_outlier_channels():
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(4, 16, 64, generator=gen)
    data[..., [5, 40]] *= 300.0  # two massive channels
    obs = Observer(QuantSpec(granularity=Granularity.PER_GROUP, groups=4, sort_channels=True, grouping="range"))
    obs(data)
    index = obs.group_index()
    assert (index == index[5]).sum() <= 2 and (index == index[40]).sum() <= 2
    scale, _ = obs.qparams()
    ordinary = [c for c in range(64) if c not in (5, 40)]
    assert float(scale[ordinary].max()) < float(scale[5]) / 50  # a fine grid for the ordinary channels
    with pytest.raises(ValueError, match="sort_channels"):
        QuantSpec(granularity=Granularity.PER_GROUP, groups=4, grouping="range")


@settings(max_examples=30)
@given(batches=batches_strategy)
def test_per_group_limits(batches):
    tensors = [torch.from_numpy(b) for b in batches]
    per_tensor = _observe(QuantSpec(), tensors)
    one_group = _observe(QuantSpec(granularity=Granularity.PER_GROUP, groups=1), tensors)
    all_groups = _observe(QuantSpec(granularity=Granularity.PER_GROUP, groups=6), tensors)
    per_channel = _observe(QuantSpec(granularity=Granularity.PER_CHANNEL), tensors)
    s1, z1 = one_group.qparams()
    st_, zt = per_tensor.qparams()
    assert torch.all(s1 == st_) and torch.all(z1 == zt)
    sg, zg = all_groups.qparams()
    sc, zc = per_channel.qparams()
    assert torch.equal(sg, sc) and torch.equal(zg, zc)


def test_weight_quantization_is_per_output_channel():
    w = torch.randn(6, 10)
    w[2] *= 100
    q, scale, zp = quantize_weight(w, QuantSpec(bits=8, symmetric=True, granularity=Granularity.PER_CHANNEL, axis=0))
    assert scale.shape == (6,) and torch.all(zp == 0)
    assert torch.allclose(scale, w.abs().max(1).values / 127)
    assert torch.all((q - w).abs() <= scale[:, None] / 2 + 1e-6)


def test_fake_quantize_module_can_be_disabled():
    obs = _observe(QuantSpec(bits=2), [torch.linspace(-1, 1, 11)])
    fq = FakeQuantize.from_observer(obs)
    x = torch.linspace(-1, 1, 11)
    assert not torch.equal(fq(x), x)
    fq.enabled = False
    assert torch.equal(fq(x), x)
