"""GPTQ weight rounding: on the conversion's grid, lower layer error than round-to-nearest,
untouched by conversion and lowering, and a better quantized model."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import outlierfx
from outlierfx.errors import PassError
from outlierfx.graph.compare import masked_mse, output_error
from outlierfx.passes import PassManager
from outlierfx.passes.convert_fake_quant import ConvertToFakeQuant
from outlierfx.passes.gptq import GPTQ
from outlierfx.quantizers.gptq_rounding import gptq_round, layer_error
from outlierfx.passes.insert_observers import InsertObservers
from outlierfx.passes.lower import Lower
from outlierfx.recipes import get_recipe
from outlierfx.quantizers.calibrate import calibrate
from outlierfx.quantizers.fake_quant import quantize_weight
from outlierfx.quantizers.policy import make_policy
from outlierfx.quantizers.spec import Estimator, weight_spec
from outlierfx.testing import OutlierSpec, build_model


def _correlated_inputs(tokens: int, features: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=g) / features ** 0.5
    scales = torch.rand(features, generator=g) * 3 + 0.1
    return (torch.randn(tokens, features, generator=g) @ mixing) * scales


def _row_spec(bits: int, estimator: Estimator, symmetric: bool):
    """Per-row weights: symmetric (codes -qmax..qmax) or asymmetric (0..qmax with a zero point)."""
    return weight_spec(bits).with_(estimator=estimator, symmetric=symmetric, signed=symmetric)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 24), cols=st.integers(2, 40), bits=st.sampled_from([4, 6, 8]),
       estimator=st.sampled_from([Estimator.MINMAX, Estimator.MSE]), symmetric=st.booleans(),
       act_order=st.booleans(), seed=st.integers(0, 2**16))
def test_gptq_weights_lie_on_the_conversion_grid_and_conversion_keeps_them(rows, cols, bits, estimator, symmetric,
                                                                            act_order, seed):
    spec = _row_spec(bits, estimator, symmetric)
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    x = _correlated_inputs(64, cols, seed)
    gram = x.T.double() @ x.double()
    rounded, _ = gptq_round(w, gram, spec, act_order=act_order)
    # MSE rows weigh each column's error by the Gram diagonal (what it costs at the output)
    _, scale, zero_point = quantize_weight(w, spec, torch.diagonal(gram).float() if estimator is Estimator.MSE
                                           else None)
    codes = rounded / scale[:, None] + zero_point[:, None]
    assert torch.allclose(codes, codes.round(), atol=1e-4)  # on the grid ConvertToFakeQuant picks
    low = -spec.qmax if symmetric else spec.qmin  # a symmetric row leaves qmin out (min-max reads max |w|)
    assert low - 1e-4 <= float(codes.min()) and float(codes.max()) <= spec.qmax + 1e-4
    # conversion re-derives the same grid (the range's ends kept in every row) and changes
    # nothing; lowering reads scales back by min-max, so it sees the same grid
    for readback in (spec, spec.with_(estimator=Estimator.MINMAX)):
        again = quantize_weight(rounded, readback)[0]
        assert torch.allclose(again, rounded, rtol=0, atol=1e-6 * float(rounded.abs().max())), readback


def test_column_weighted_mse_rows_trade_error_toward_the_columns_that_cost_more():
    w = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    w[:, 0] *= 6  # one wide column sets each row's range
    spec = weight_spec(4).with_(estimator=Estimator.MSE)
    cost = torch.ones(32)
    cost[0] = 100.0  # ...and its error costs most at the output
    plain, weighted = quantize_weight(w, spec)[0], quantize_weight(w, spec, cost)[0]
    def weighted_error(q):
        return float(((q - w) ** 2 * cost).sum())
    assert weighted_error(weighted) < weighted_error(plain)
    assert float(((weighted - w) ** 2).sum()) >= float(((plain - w) ** 2).sum())  # plain MSE is optimal unweighted
    assert torch.equal(quantize_weight(w, spec, torch.ones(32))[0], plain)
    with pytest.raises(ValueError, match="column weights"):
        quantize_weight(w, spec, torch.ones(31))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_lowers_the_layer_output_error_against_round_to_nearest(bits, symmetric):
    spec = _row_spec(bits, Estimator.MINMAX, symmetric)
    for seed in range(3):
        w = torch.randn(48, 64, generator=torch.Generator().manual_seed(seed))
        x = _correlated_inputs(512, 64, seed + 10)
        gram = x.T.double() @ x.double()
        rounded, _ = gptq_round(w, gram, spec)
        nearest = quantize_weight(w, spec)[0]
        # the error GPTQ minimises, and the one it should lower, measured directly
        assert layer_error(w, rounded, gram) < 0.7 * layer_error(w, nearest, gram)
        assert float(((x @ (w - rounded).T) ** 2).sum()) == pytest.approx(layer_error(w, rounded, gram), rel=1e-6)


@pytest.mark.parametrize("symmetric", [True, False])
def test_act_order_beats_the_natural_column_order_when_a_few_input_channels_are_large(symmetric):
    """A few input channels with 10x activations, placed last: in the weight's own order GPTQ
    rounds them when no column is left to absorb their error; in act order (decreasing H_jj)
    they go first. Int4 MSE-clipped rows, as the W4 preset rounds them."""
    spec = _row_spec(4, Estimator.MSE, symmetric)
    for seed in range(3):
        x = _correlated_inputs(512, 96, seed)
        x[:, -4:] *= 10
        w = torch.randn(64, 96, generator=torch.Generator().manual_seed(seed + 100))
        gram = x.T.double() @ x.double()
        act, natural = (layer_error(w, gptq_round(w, gram, spec, act_order=a)[0], gram) for a in (True, False))
        assert act < 0.7 * natural, (seed, act, natural)


def test_act_order_is_only_the_rounding_order():
    """Act order depends on the Hessian diagonal, not on where a column sits: permuting the
    columns of W and H permutes the rounded weight (the codes go back to their columns). Where the
    diagonal already decreases, both orders round the same way, bit for bit."""
    spec = _row_spec(4, Estimator.MINMAX, symmetric=False)  # min-max: the grid is exactly order-free
    w = torch.randn(16, 24, generator=torch.Generator().manual_seed(3))
    x = _correlated_inputs(256, 24, 4)
    gram = x.T.double() @ x.double()
    rounded, _ = gptq_round(w, gram, spec)
    shuffle = torch.randperm(24, generator=torch.Generator().manual_seed(5))
    assert torch.equal(gptq_round(w[:, shuffle], gram[shuffle][:, shuffle], spec)[0], rounded[:, shuffle])
    descending = torch.argsort(torch.diagonal(gram), descending=True)
    w, gram = w[:, descending], gram[descending][:, descending]
    assert torch.equal(gptq_round(w, gram, spec, act_order=False)[0], gptq_round(w, gram, spec)[0])
    assert not torch.equal(gptq_round(w[:, shuffle], gram[shuffle][:, shuffle], spec, act_order=False)[0],
                           gptq_round(w, gram, spec)[0][:, shuffle])


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 24), cols=st.integers(2, 40), bits=st.sampled_from([4, 8]), symmetric=st.booleans(),
       seed=st.integers(0, 2**16))
def test_refit_row_steps_keep_the_codes_lower_each_rows_error_and_read_back(rows, cols, bits, symmetric, seed):
    """``refit_scales``: each row keeps GPTQ's codes and zero point with the least-squares step,
    so no row's output error grows (the old step is one of the candidates) and min-max (the
    conversion's and lowering's readback) finds the row's new grid and changes nothing."""
    spec = _row_spec(bits, Estimator.MSE, symmetric)
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    x = _correlated_inputs(4 * cols, cols, seed)
    gram = x.T.double() @ x.double()
    plain, _ = gptq_round(w, gram, spec)
    refit, _ = gptq_round(w, gram, spec, refit_scales=True)

    def row_errors(q):
        delta = w.double() - q.double()
        return torch.einsum("oi,ij,oj->o", delta, gram, delta)

    assert bool((row_errors(refit) <= row_errors(plain) * (1 + 1e-9) + 1e-12).all())
    readback = spec.with_(estimator=Estimator.MINMAX)
    for rounded in (plain, refit):
        _, scale, zero_point = quantize_weight(rounded, readback)
        codes = rounded / scale[:, None] + zero_point[:, None]
        assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert torch.allclose(quantize_weight(refit, readback)[0], refit, rtol=0, atol=1e-6 * float(refit.abs().max()))
    plain_levels = plain / quantize_weight(plain, readback)[1][:, None]
    refit_levels = refit / quantize_weight(refit, readback)[1][:, None]
    assert torch.allclose(plain_levels, refit_levels, atol=1e-3)  # the same codes minus zero point


def test_refit_row_steps_lower_the_int4_layer_error():
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(7))
    x = _correlated_inputs(512, 96, 8)
    gram = x.T.double() @ x.double()
    spec = _row_spec(4, Estimator.MSE, symmetric=False)
    plain, refit = (layer_error(w, gptq_round(w, gram, spec, refit_scales=r)[0], gram) for r in (False, True))
    assert refit < 0.995 * plain, (refit, plain)


def _calibrated(g, policy):
    gm = outlierfx.capture(g.model, g.inputs)
    observed = PassManager([InsertObservers(policy)])(gm).graph_module
    calibrate(observed, [g.inputs], progress=False)
    return observed


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 32), cols=st.integers(2, 48), seed=st.integers(0, 2**16))
def test_asymmetric_int4_gptq_never_loses_to_round_to_nearest_on_its_grid(rows, cols, seed):
    """Int4 rows on the asymmetric grid (16 levels over an MSE-clipped range with a zero point):
    GPTQ's layer error is at most round-to-nearest's on the same grid, even after restoring
    the codes that keep a row's range readable."""
    from outlierfx.quantizers.gptq_rounding import row_grid

    spec = _row_spec(4, Estimator.MSE, symmetric=False)
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    x = _correlated_inputs(4 * cols, cols, seed)
    gram = x.T.double() @ x.double()
    rounded, _ = gptq_round(w, gram, spec)
    scale, zero_point = row_grid(w, spec, gram)
    nearest = (torch.clamp(torch.round(w / scale[:, None]) + zero_point[:, None], spec.qmin, spec.qmax)
               - zero_point[:, None]) * scale[:, None]
    assert layer_error(w, rounded, gram) <= layer_error(w, nearest, gram) * (1 + 1e-9)


def test_asymmetric_int4_rows_beat_symmetric_ones_at_the_layer_output():
    """16 levels with a zero point against 15 symmetric ones, each with GPTQ on an MSE-clipped
    range: the asymmetric rows' layer error is lower (the W4A8 hypothesis, on a random layer)."""
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(1))
    x = _correlated_inputs(512, 96, 2)
    gram = x.T.double() @ x.double()
    errors = [layer_error(w, gptq_round(w, gram, _row_spec(4, Estimator.MSE, symmetric))[0], gram)
              for symmetric in (True, False)]
    assert errors[1] < 0.9 * errors[0], errors


@pytest.mark.parametrize("symmetric", [True, False])
def test_converted_int4_weights_are_gptqs_and_lower_to_int8_codes(symmetric):
    """ConvertToFakeQuant reads each row's grid back from GPTQ's weight (by an MSE range search
    whose first candidate is the min-max range) and so writes GPTQ's weight unchanged; the LM
    head keeps symmetric 8-bit rows. Lowering runs asymmetric int4 rows as int8 codes
    ``k - zero point`` (no zero-point term in the GEMM) and computes the fake-quant model; the
    codes rebuild each weight bit for bit."""
    from outlierfx.graph import meta
    from outlierfx.graph.attrs import fetch_attr
    from outlierfx.quantizers.integer_codes import integer_weight

    g = build_model("llama", layers=1, hidden=32, ffn=64, batch=4, seq=16,
                    outliers=OutlierSpec(gamma_scale=10.0, channels=(3,)), tied=False)
    policy = make_policy("linear-inputs", "W4A8")
    spec = policy.weight.with_(estimator=Estimator.MSE, symmetric=symmetric, signed=symmetric)
    result = GPTQ([g.inputs], spec, policy.embedding)(_calibrated(g, policy))
    converted = ConvertToFakeQuant(spec, policy.embedding)(result.graph_module).graph_module
    nodes = {n.name: n for n in converted.graph.nodes}
    assert len(result.plan.weights) >= 8
    for name, weight in result.plan.weights.items():
        after = fetch_attr(converted, str(nodes[name].args[1].target))
        assert torch.allclose(after, weight, rtol=0, atol=1e-6 * float(weight.abs().max())), name
        held = integer_weight(after, nodes[name].meta[meta.WEIGHT_QUANT])
        assert held.codes.dtype == torch.int8 and torch.equal(held.weight(), after), name
        assert int(held.codes.abs().max()) <= (7 if symmetric else 15) or nodes[name].meta[meta.WEIGHT_QUANT].bits == 8
    head = [n.meta[meta.WEIGHT_QUANT] for n in nodes.values()
            if n.meta.get(meta.WEIGHT_QUANT) is not None and n.meta[meta.WEIGHT_QUANT].bits == 8]
    assert head and all(spec.symmetric for spec in head)
    lowered = Lower("reference")(converted).graph_module
    with torch.no_grad():
        assert output_error(converted(**g.inputs), lowered(**g.inputs)).within(1e-5)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_gptq_pass_fires_leaves_its_input_alone_and_lowers_the_model_error(family):
    g = build_model(family, layers=2, hidden=32, ffn=64, batch=4, seq=16,
                    outliers=OutlierSpec(gamma_scale=10.0, channels=(3,)), tied=family == "llama")
    policy = make_policy("linear-inputs", "W4A8")
    observed = _calibrated(g, policy)
    before = {k: v.clone() for k, v in observed.state_dict().items()}
    result = GPTQ([g.inputs], policy.weight, policy.embedding)(observed)
    plan = result.plan
    assert result.modified and plan.linears and set(plan.weights) == {r.node for r in plan.linears}
    assert sum(r.gptq_error for r in plan.linears) < 0.8 * sum(r.nearest_error for r in plan.linears), plan.summary()
    assert plan.act_order and ", act order)" in plan.summary()  # GPTQ's standard order by default
    if family == "llama":  # the LM head shares the embedding table: left as it was
        assert [why for _, why in plan.skipped] == ["weight tied to another reader"]
    for k, v in observed.state_dict().items():
        assert torch.equal(v, before[k]), k
    convert = ConvertToFakeQuant(policy.weight, policy.embedding)
    plain, rounded = convert(observed).graph_module, convert(result.graph_module).graph_module
    with torch.no_grad():
        ref = g.model(**g.inputs)
        ref = ref.logits if family == "llama" else ref.last_hidden_state
        mask = g.inputs["attention_mask"]
        errors = [float(masked_mse(m(**g.inputs), ref, mask)) for m in (plain, rounded)]
    assert errors[1] < errors[0], errors
    # conversion kept GPTQ's grid points; the reference lowering computes the same model
    lowered = Lower("reference")(rounded).graph_module
    with torch.no_grad():
        assert output_error(rounded(**g.inputs), lowered(**g.inputs)).within(1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sequential_gptq_rounds_each_linear_on_inputs_from_the_already_rounded_model(family):
    """Each Linear's Gram matrix comes from the model whose earlier Linears carry their rounded
    weights: the Gram of its input in the *finished* graph (everything rounded; later Linears
    cannot reach an earlier one's input) must give back exactly the weight GPTQ wrote."""
    from outlierfx.graph.attrs import fetch_attr
    from outlierfx.passes.convert_fake_quant import linear_weight_spec

    g = build_model(family, layers=2, hidden=32, ffn=64, batch=4, seq=16,
                    outliers=OutlierSpec(gamma_scale=10.0, channels=(3,)))
    policy = make_policy("linear-inputs", "W4A8")
    observed = _calibrated(g, policy)
    batches = [g.inputs, {k: v[:2, :9] for k, v in g.inputs.items()}]  # two batches of different shapes
    sequential = GPTQ(batches, policy.weight, policy.embedding, sequential=True)(observed)
    parallel = GPTQ(batches, policy.weight, policy.embedding, sequential=False)(observed)
    assert sequential.modified and len(sequential.plan.linears) == len(parallel.plan.linears) >= 8
    first = sequential.plan.linears[0].node  # nothing upstream was rounded: the same Gram, the same weight
    assert torch.equal(sequential.plan.weights[first], parallel.plan.weights[first])
    assert any(not torch.equal(sequential.plan.weights[r.node], parallel.plan.weights[r.node])
               for r in sequential.plan.linears[1:])
    finished = sequential.graph_module
    nodes = {n.name: n for n in finished.graph.nodes}
    grams = GPTQ(batches, policy.weight, policy.embedding, sequential=False)._gram_matrices(
        finished, [nodes[r.node] for r in sequential.plan.linears])
    for r in sequential.plan.linears:
        node = nodes[r.node]
        float_weight = fetch_attr(observed, str({n.name: n for n in observed.graph.nodes}[r.node].args[1].target))
        again, _ = gptq_round(float_weight, grams[r.node][0], linear_weight_spec(node, policy.weight))
        assert torch.equal(again, fetch_attr(finished, str(node.args[1].target))), r.node
        assert grams[r.node][1] == r.tokens


def test_gptq_pass_rounds_in_the_natural_column_order_when_asked():
    from outlierfx.graph.attrs import fetch_attr
    from outlierfx.passes.convert_fake_quant import linear_weight_spec

    g = build_model("llama", layers=1, hidden=32, ffn=64, batch=4, seq=16,
                    outliers=OutlierSpec(gamma_scale=10.0, channels=(3,)))
    policy = make_policy("linear-inputs", "W4A8")
    observed = _calibrated(g, policy)
    natural = GPTQ([g.inputs], policy.weight, policy.embedding, act_order=False)(observed).plan
    default = GPTQ([g.inputs], policy.weight, policy.embedding)(observed).plan
    assert not natural.act_order and ", natural column order)" in natural.summary()
    assert any(not torch.equal(natural.weights[r.node], default.weights[r.node]) for r in natural.linears)
    nodes = {n.name: n for n in observed.graph.nodes}
    grams = GPTQ([g.inputs], policy.weight, policy.embedding)._gram_matrices(
        observed, [nodes[r.node] for r in natural.linears])
    for r in natural.linears:
        weight = fetch_attr(observed, str(nodes[r.node].args[1].target))
        again, _ = gptq_round(weight, grams[r.node][0], linear_weight_spec(nodes[r.node], policy.weight),
                              act_order=False)
        assert torch.equal(again, natural.weights[r.node]), r.node


def test_gptq_recipe_suffix_and_bad_inputs():
    g = build_model("gpt2", layers=1, batch=2, seq=8)
    _, report = outlierfx.quantize(g.model, [g.inputs], recipe="naive+gptq", bits="W4A8",
                                   generation=False, progress=False)
    assert [e.pass_name for e in report.audit][-2:] == ["GPTQ", "ConvertToFakeQuant"]
    assert report.recipe == "naive+gptq"
    assert get_recipe("os+lsq+gptq").name == "os+lsq+gptq"
    with pytest.raises(ValueError, match="unknown recipe"):
        get_recipe("nope+gptq")
    policy = make_policy("full", "W8A8")
    with pytest.raises(ValueError, match="batches"):
        GPTQ([], policy.weight)
    gm = outlierfx.capture(g.model, g.inputs)
    with pytest.raises(PassError, match="calibrated"):
        GPTQ([g.inputs], policy.weight)(PassManager([InsertObservers(policy)])(gm).graph_module)
