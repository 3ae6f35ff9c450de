"""The first token on an activation grid of its own (``QuantSpec.sink_tokens``, recipe suffix ``+sink``)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import outlierfx
from outlierfx.graph.compare import output_error
from outlierfx.graph.first_tokens import first_token_mask
from outlierfx.graph.roles import Role
from outlierfx.passes.lower import Lower
from outlierfx.backends import FirstTokens
from outlierfx.backends.int8_linear import QuantizedLinear
from outlierfx.recipes import SPEED_SINK_MIN_WIDENING, get_recipe
from outlierfx.quantizers.fake_quant import fake_quantize, qparams_from_range
from outlierfx.quantizers.observers import FakeQuantize, Observer, token_mask
from outlierfx.quantizers.policy import parse_bits
from outlierfx.quantizers.spec import Granularity, QuantSpec
from outlierfx.testing import assert_tokens_close, build_model


def _calibrated(spec, batches, roles=frozenset({Role.LINEAR_INPUT}), masks=None):
    observer = Observer(spec, "x", roles)
    for i, x in enumerate(batches):
        with token_mask(None if masks is None else masks[i]):
            observer(x)
    return observer, FakeQuantize.from_observer(observer)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3), seq=st.integers(4, 12), channels=st.integers(1, 8), spike=st.floats(1.0, 1e3),
       grouped=st.booleans(), widening=st.sampled_from([1.0, 1.5]), seed=st.integers(0, 2**16))
def test_each_grid_covers_its_own_tokens_and_quantizes_them(n, seq, channels, spike, grouped, widening, seed):
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randn(2, seq, channels, generator=gen) for _ in range(2)]
    batches[0][:, 0] *= spike  # the sink token's massive activation
    base = QuantSpec(granularity=Granularity.PER_GROUP, groups=1) if grouped else QuantSpec()
    observer, fq = _calibrated(base.with_(sink_tokens=n, sink_min_widening=widening), batches)
    data = torch.cat(batches)
    rest_lo, rest_hi = data[:, n:].amin(), data[:, n:].amax()
    assert torch.allclose(observer.min_val.min(), rest_lo) and torch.allclose(observer.max_val.max(), rest_hi)
    assert observer.sink_min == data[:, :n].amin() and observer.sink_max == data[:, :n].amax()
    out = fq(data)
    # per tensor, the first tokens share the main grid where it covers them, or where covering
    # them widens the rest's range by less than sink_min_widening; groups always give them a grid
    rest_scale, rest_zp = qparams_from_range(rest_lo, rest_hi, base)
    joined, _ = qparams_from_range(data.amin(), data.amax(), base)
    lo, hi = (base.qmin - rest_zp) * rest_scale, (base.qmax - rest_zp) * rest_scale
    fits = bool(observer.sink_min >= lo) and bool(observer.sink_max <= hi)
    shared = not grouped and (fits or float(joined) < widening * float(rest_scale))
    assert fq.has_sink_grid != shared
    if shared:
        assert torch.equal(out, fake_quantize(data, fq.scale, fq.zero_point, fq.spec))
        assert float((out - data).abs().max()) <= float(fq.scale) * 0.5001  # no token clipped
        assert float(fq.scale) <= widening * float(rest_scale) * (1 + 1e-6)
        return
    sink_scale, sink_zp = qparams_from_range(data[:, :n].amin(), data[:, :n].amax(), base.sink_spec())
    assert torch.equal(out[:, :n], fake_quantize(data[:, :n], sink_scale, sink_zp, base.sink_spec()))
    assert torch.equal(out[:, n:], fake_quantize(data[:, n:], fq.scale, fq.zero_point, fq.spec))
    # neither grid clips its own tokens beyond half a step
    assert float((out[:, :n] - data[:, :n]).abs().max()) <= float(sink_scale) * 0.5001
    assert float((out[:, n:] - data[:, n:]).abs().max()) <= float(fq.scale.max()) * 0.5001


def test_a_massive_first_token_no_longer_sets_the_other_tokens_step():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, 32, generator=gen)
    x[:, 0, 3] = 500.0
    _, plain = _calibrated(QuantSpec(), [x])
    _, sink = _calibrated(QuantSpec(sink_tokens=1), [x])
    error = {name: float((fq(x)[:, 1:] - x[:, 1:]).pow(2).mean()) for name, fq in (("plain", plain), ("sink", sink))}
    assert error["sink"] < error["plain"] / 1000


def test_padding_and_attention_matrices_are_left_alone():
    x = torch.randn(2, 6, 4)
    x[1, 4:] = 1e4  # padded positions of the second sequence
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    observer, _ = _calibrated(QuantSpec(sink_tokens=1), [x], masks=[mask])
    assert float(observer.max_val) == float(x[:, 1:][mask[:, 1:].bool()].max())
    probs = torch.rand(2, 3, 6, 6)  # [batch, heads, seq, seq]: axis 1 is not the position
    observer, fq = _calibrated(QuantSpec(sink_tokens=1), [probs], roles=frozenset({Role.ATTN_PROBS}))
    assert not observer.sink_min.numel() and not fq.has_sink_grid


@pytest.mark.parametrize("n", [1, 2])
def test_a_left_padded_batch_calibrates_and_quantizes_each_texts_first_real_tokens_on_their_grid(n):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 4, generator=gen)
    mask = torch.tensor([[1] * 7, [0] * 3 + [1] * 4, [0] * 6 + [1]])  # left padding of 0, 3 and 6
    firsts = [(0, range(n)), (1, range(3, 3 + n)), (2, [6])]  # the last text has one token
    for row, columns in firsts:
        x[row, list(columns)] = 300.0 + row  # massive activations on each text's first tokens
    x[1, :3] = -50.0  # padding: in no range
    observer, fq = _calibrated(QuantSpec(sink_tokens=n), [x], masks=[mask])
    assert (float(observer.sink_min), float(observer.sink_max)) == (300.0, 302.0)
    first = first_token_mask(mask, None, n)
    assert first.sum(1).tolist() == [n, n, 1]
    assert float(observer.max_val) == float(x[mask.bool() & ~first].max()) < 300.0
    assert float(observer.min_val) > -50.0
    # the quantizer given the mask puts those tokens on their grid, as a slice does for column 0
    out = fq(x, first)
    assert torch.equal(out[first], fake_quantize(x[first], fq.sink_scale, fq.sink_zero_point, fq.spec.sink_spec()))
    assert torch.equal(out[~first], fake_quantize(x[~first], fq.scale, fq.zero_point, fq.spec))
    unpadded = torch.ones_like(mask)
    assert torch.equal(fq(x, first_token_mask(unpadded, None, n)), fq(x))  # columns 0..n-1, as without a mask


def test_a_decode_step_behind_a_filled_cache_has_no_first_token():
    filled = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])  # cache columns, the first row left-padded
    assert first_token_mask(filled, torch.arange(4), 1).tolist() == [[False, False, True, False],
                                                                        [True, False, False, False]]
    assert not first_token_mask(filled, torch.tensor([4]), 1).any()


def test_sink_tokens_is_validated():
    with pytest.raises(ValueError, match="sink_tokens"):
        QuantSpec(sink_tokens=-1)


def test_the_suffix_sets_every_activation_spec_and_the_pass_fires_on_llama():
    recipe = get_recipe("naive+sink")
    policy = recipe.policy(parse_bits("W8A8"), None)
    assert policy.activation.sink_tokens == 1
    assert all(o.spec is None or o.spec.sink_tokens == 1 for o in policy.overrides)
    assert get_recipe("smooth+sink").name == "smooth+sink"

    g = build_model("llama", hidden=32, layers=2)
    ids = g.inputs["input_ids"]
    sink_id = int(ids.max()) + 1  # a token only the first position holds, with a massive embedding
    ids[:, 0] = sink_id
    with torch.no_grad():
        g.model.get_input_embeddings().weight[sink_id] *= 200
        reference = g.model(**g.inputs).logits[:, 1:]
    plain, _ = outlierfx.quantize(g.model, [g.inputs], recipe="naive", generation=False, progress=False)
    sunk, _ = outlierfx.quantize(g.model, [g.inputs], recipe="naive+sink", generation=False, progress=False)
    grids = [m for m in sunk.modules() if isinstance(m, FakeQuantize) and m.has_sink_grid]
    assert grids  # the residual stream, norm outputs and Linear inputs carry a first-token grid
    assert not any(m.has_sink_grid for m in sunk.modules() if isinstance(m, FakeQuantize)
                   and m.roles & {Role.ATTN_SCORES, Role.ATTN_PROBS})
    # the reference form runs their first rows beside the main graph, and computes the same outputs
    lowered = Lower("reference")(sunk)
    assert not lowered.plan.simulated
    assert any(lin.kernel.first_tokens is FirstTokens.SECOND_GEMM for lin in lowered.plan.linears)
    with torch.no_grad():
        assert output_error(sunk(**g.inputs), lowered.graph_module(**g.inputs)).within(1e-5)
        errors = [float((m(**g.inputs).logits[:, 1:] - reference).pow(2).mean()) for m in (plain, sunk)]
    assert errors[1] < errors[0] / 4, errors  # the other tokens get their precision back


def test_first_tokens_get_a_grid_of_their_own_only_where_they_widen_the_range_enough():
    limited = QuantSpec(sink_tokens=1, sink_min_widening=SPEED_SINK_MIN_WIDENING)
    torch.manual_seed(0)  # the draw depended on the tests a worker ran before
    x = torch.randn(4, 6, 8)
    inside = x * torch.tensor([0.5] + [1.0] * 5)[None, :, None]
    observer, fq = _calibrated(limited, [inside])
    assert observer.sink_qparams() is None and not fq.has_sink_grid
    assert torch.equal(fq.scale, qparams_from_range(observer.min_val, observer.max_val, fq.spec)[0])  # the rest's grid

    rest = x[:, 1:]
    near = x.clone()
    near[:, 0] = rest.amax() * 1.2  # widens the range by less than the limit: shared, and not clipped
    shared, fq = _calibrated(limited, [near])
    assert shared.sink_qparams() is None and not fq.has_sink_grid
    scale, zero_point = fq.scale, fq.zero_point
    # the grid's top is the range's max up to the zero point's rounding (half a step): not clipped
    assert float((fq.spec.qmax - zero_point) * scale) >= float(near[:, 0].max()) - float(scale) / 2
    assert float(scale) > float(qparams_from_range(rest.amin(), rest.amax(), fq.spec)[0])

    spiked = x.clone()
    spiked[:, 0] *= 30
    outside, fq = _calibrated(limited, [spiked])
    assert outside.sink_qparams() is not None and fq.has_sink_grid
    assert torch.equal(fq.scale, qparams_from_range(outside.min_val, outside.max_val, fq.spec)[0])

    # by default (the accuracy recipes) the first token keeps its grid wherever it does not fit
    observer, fq = _calibrated(QuantSpec(sink_tokens=1), [inside])
    assert observer.sink_qparams() is None and not fq.has_sink_grid
    observer, fq = _calibrated(QuantSpec(sink_tokens=1), [near])
    assert observer.sink_qparams() is not None and fq.has_sink_grid


def test_only_the_speed_route_limits_its_first_token_grids():
    bits = parse_bits("W8A8")
    assert get_recipe("smooth-fold+sink").policy(bits, None).activation.sink_min_widening == SPEED_SINK_MIN_WIDENING
    for name in ("smooth-peg+sink", "naive+sink", "os+sink"):
        activation = get_recipe(name).policy(bits, None).activation
        assert activation.sink_tokens == 1 and activation.sink_min_widening == 1.0, name
    with pytest.raises(ValueError, match="sink_min_widening"):
        QuantSpec(sink_tokens=1, sink_min_widening=0.5)


@pytest.mark.parametrize("engine", [e for e in ("x86", "onednn") if e in torch.backends.quantized.supported_engines])
def test_linear_inputs_with_first_token_grids_lower_to_two_int8_gemms(engine, every_first_token_grid):
    g = build_model("bert", hidden=32, layers=2)
    qmodel, _ = outlierfx.quantize(g.model, [g.inputs], recipe="naive+sink", policy="linear-inputs", progress=False)
    result = Lower(engine)(qmodel)
    split = [lin for lin in result.plan.linears if lin.kernel.first_tokens is not FirstTokens.NONE]
    assert split and all(lin.is_int8 for lin in result.plan.linears), result.plan.summary()
    modules = [m for m in result.graph_module.modules() if isinstance(m, QuantizedLinear) and m.sink is not None]
    layers = g.config.num_hidden_layers
    # onednn runs Q, K and V as one GEMM
    assert len(modules) == len(split) - (2 * layers if engine == "onednn" else 0)
    # no quantizer stays simulated: what else reads one (the post-LN residual) gets its codes' values
    gm = result.graph_module
    assert not result.plan.simulated
    assert not any(n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), FakeQuantize)
                   for n in gm.graph.nodes)
    if engine == "onednn":  # codes made for the attention input, the context and the FFN input; the
        from outlierfx.backends.runtime import two_grid_codes  # FFN-in GEMM hands its own on

        made = [n for n in result.graph_module.graph.nodes if n.target is two_grid_codes]
        assert len(made) == 3 * layers
        assert sum(m.gelu is not None and m.sink_out is not None for m in modules) == layers
    assert_tokens_close(Lower("reference")(qmodel).graph_module, result.graph_module, g.inputs)


@pytest.mark.skipif("onednn" not in torch.backends.quantized.supported_engines, reason="no onednn engine")
def test_onednn_computes_the_first_rows_on_their_own_grid_exactly():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randint(-127, 128, (16, 8), dtype=torch.int8, generator=gen)
    w_scale = torch.rand(16, generator=gen).double() * 0.01 + 1e-3
    bias = torch.randn(16, generator=gen)
    x = torch.randn(2, 5, 8, generator=gen)
    x[:, 0] *= 50  # the sink token
    grids = {"main": (0.02, 120), "sink": (0.5, 100)}

    def on_grid(part, scale, zero_point):  # the codes the module computes, dequantized
        return torch.quantize_per_tensor(part.contiguous(), scale, zero_point, torch.quint8).dequantize()

    dense = weight.float() * w_scale.float()[:, None]
    expected = torch.cat([torch.nn.functional.linear(on_grid(x[:, :1], *grids["sink"]), dense, bias),
                          torch.nn.functional.linear(on_grid(x[:, 1:], *grids["main"]), dense, bias)], 1)
    module = QuantizedLinear(weight, w_scale, bias, (*grids["main"], 0, 255), None, "onednn", sink=(1, *grids["sink"]))
    with torch.no_grad():
        out = module(x)
    assert float((out - expected).abs().max()) <= 1e-4 * float(expected.abs().max())
    plain = QuantizedLinear(weight, w_scale, bias, (*grids["main"], 0, 255), None, "onednn")
    assert float((plain(x)[:, :1] - expected[:, :1]).abs().max()) > 1.0  # without the sink grid, row 0 is clipped
    # a fused residual whose first row is huge (a Llama's residual stream at the sink token) must
    # not cost the first row its precision
    residual = torch.randn(2, 5, 16, generator=gen)
    residual[:, 0] *= 1e4
    with_residual = QuantizedLinear(weight, w_scale, bias, (*grids["main"], 0, 255), None, "onednn",
                                    sink=(1, *grids["sink"]), residual=True)
    with torch.no_grad():
        got = with_residual(x, residual) - residual
    assert float((got - expected).abs().max()) <= 1e-4 * float(expected.abs().max())
    # GELU and requantization to two output grids, reading the two-grid codes as they are
    outs = {"main": (0.01, 10), "sink": (0.2, 5)}
    fused = QuantizedLinear(weight, w_scale, bias, (*grids["main"], 0, 255), outs["main"], "onednn",
                            gelu="none", sink=(1, *grids["sink"]), sink_out=(1, *outs["sink"]))
    gelu = torch.nn.functional.gelu(expected)
    want = torch.cat([on_grid(gelu[:, :1], *outs["sink"]), on_grid(gelu[:, 1:], *outs["main"])], 1)
    with torch.no_grad():
        codes = fused(fused.input_codes(x))
    assert codes.dtype == torch.uint8
    got = torch.cat([(codes[:, :1].float() - outs["sink"][1]) * outs["sink"][0],
                     (codes[:, 1:].float() - outs["main"][1]) * outs["main"][0]], 1)
    steps = torch.tensor([outs["sink"][0]] + [outs["main"][0]] * 4)[None, :, None]
    assert bool(((got - want).abs() <= steps * 1.001).all())  # rounding ties: one step at most
