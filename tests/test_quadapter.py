"""Quadapter: insertion, block-wise training of the scales, folding, recipes."""

import pytest
import torch
from hypothesis import given, settings

import outlierfx
from outlierfx.backends import Kernel, KernelKind, PostOp
from outlierfx.errors import PassError
from outlierfx.graph.attrs import fetch_attr
from outlierfx.graph.ops import users_through_layout_ops
from outlierfx.graph.probe import probe
from outlierfx.passes import PassManager
from outlierfx.passes.convert_fake_quant import ConvertToFakeQuant
from outlierfx.passes.insert_observers import InsertObservers, observers
from outlierfx.passes.fold_quadapter import FoldQuadapter
from outlierfx.passes.quadapter import SCALE_PREFIX, InsertQuadapter, inserted_sites, scale_parameters
from outlierfx.passes.train_quadapter import TrainQuadapter, unfolded_fake_quant
from outlierfx.quantizers.calibrate import calibrate
from outlierfx.quantizers.observers import FakeQuantize, Observer
from outlierfx.quantizers.spec import weight_spec
from outlierfx.quantizers.trainable import TrainableActivationQuantizer
from outlierfx.testing import OutlierSpec, assert_equivalent, assert_tokens_close, build_model, transformer_models

TOL = 1e-5


def _calibrated(g, bits="W8A8", policy="full"):
    from outlierfx.quantizers.policy import make_policy

    gm = outlierfx.capture(g.model, g.inputs)
    observed = PassManager([InsertObservers(make_policy(policy, bits))])(gm).graph_module
    calibrate(observed, [g.inputs], progress=False)
    return observed


def _tensors(gm):
    return {k: v.detach().clone() for k, v in gm.state_dict().items()
            if not k.startswith(SCALE_PREFIX) and not k.startswith("outlierfx_observer_")}


def _expected_sites(g):
    """Norm -> Linear edges inside the blocks: QKV and MLP input of every layer (BERT: the
    embedding LayerNorm and each attention-output LayerNorm; the last LayerNorm feeds the output)."""
    return 2 * g.config.num_hidden_layers


@settings(max_examples=5)
@given(g=transformer_models())
def test_insertion_is_exact_with_quantizers_off_for_any_scale(g):
    observed = _calibrated(g)
    result = PassManager([InsertQuadapter()])(observed)  # the manager checks equivalence too
    inserted = result.graph_module
    plan = result.audit.entries[0].plan
    assert result.modified and len(plan.sites) == _expected_sites(g)
    scales = scale_parameters(inserted)
    # one parameter per channel at each chosen site, nothing else learnable was added
    assert sum(p.numel() for p in scales.values()) == plan.parameters == _expected_sites(g) * g.config.hidden_size
    if g.family == "bert":  # post-LN: every site except the last also feeds a residual shortcut
        assert sum(len(s.compensated) for s in plan.sites) == _expected_sites(g)
    else:
        assert not any(s.compensated for s in plan.sites)
    gen = torch.Generator().manual_seed(0)
    for p in scales.values():  # any s: observers return their input, so the graph is exact
        p.data = torch.randn(p.shape, generator=gen) * 2
    assert_equivalent(g.model, inserted, g.inputs, tol=TOL)
    # ... and s sits inside the activation quantizer: Q reads x * s, every consumer reads Q(x s) / s
    for site in inserted_sites(inserted):
        assert site.quantizer.args[0] is site.input_mul
        assert isinstance(inserted.get_submodule(str(site.quantizer.target)), Observer)
        assert len(site.weight_muls) + len(site.compensations) == len(list(users_through_layout_ops(site.quantizer)))


def test_linear_inputs_leave_post_ln_shortcuts_float_and_quadapter_compensates_them():
    from outlierfx.graph.view import GraphView

    g = build_model("bert", layers=2, hidden=32, batch=2, seq=10)
    observed = _calibrated(g, "W8A8", "linear-inputs")
    shortcuts = [r.shortcut for r in GraphView(observed).residual_adds]
    # the shortcut reads the float norm output; the norm's observer feeds Linears only
    post_ln = [n for n in shortcuts if n.target is torch.ops.aten.layer_norm.default]
    assert len(post_ln) == _expected_sites(g)
    for norm in post_ln:
        (observer,) = [u for u in norm.users if u.op == "call_module"]
        assert all(u.target is torch.ops.aten.linear.default for u in observer.users)
    result = PassManager([InsertQuadapter()])(observed)  # the manager checks equivalence too
    inserted, plan = result.graph_module, result.audit.entries[0].plan
    assert len(plan.sites) == _expected_sites(g)
    assert sum(len(s.compensated) for s in plan.sites) == _expected_sites(g)
    sites = inserted_sites(inserted)
    assert all(c.args[0] is site.input_mul for site in sites for c in site.compensations)  # (x s) / s, not Q(x s) / s
    gen = torch.Generator().manual_seed(0)
    for p in scale_parameters(inserted).values():
        p.data = torch.randn(p.shape, generator=gen) * 2
    assert_equivalent(g.model, inserted, g.inputs, tol=TOL)
    folded = PassManager([FoldQuadapter()])(inserted).graph_module
    assert not inserted_sites(folded)
    assert_equivalent(g.model, folded, g.inputs, tol=TOL)


@settings(max_examples=4)
@given(g=transformer_models())
def test_training_moves_only_the_scales_and_folding_keeps_the_trained_outputs(g):
    observed = _calibrated(g)
    inserted = InsertQuadapter()(observed).graph_module
    weights = _tensors(inserted)
    stats = {n: (o.min_val.clone(), o.max_val.clone()) for n, o in observers(inserted).items()}
    result = PassManager([TrainQuadapter([g.inputs], max_steps=15, lr=5e-2, progress=False)])(inserted)
    trained, plan = result.graph_module, result.audit.entries[0].plan
    assert plan.weights_unchanged
    for name, value in _tensors(trained).items():  # the model's weights, bit for bit
        assert torch.equal(value, weights[name]), name
    for name, (lo, hi) in stats.items():  # the input graph is untouched (observers included)
        assert torch.equal(observers(inserted)[name].min_val, lo) and torch.equal(observers(inserted)[name].max_val, hi)
    assert all(float(p.detach().abs().max()) == 0 for p in scale_parameters(inserted).values())
    assert plan.parameters == _expected_sites(g) * g.config.hidden_size
    assert sum(b.steps for b in plan.blocks) > 0
    assert all(b.loss_after <= b.loss_before for b in plan.blocks)  # never worse than the initialisation
    assert {t for b in plan.blocks for t in b.sites} == set(scale_parameters(inserted))  # every site trained

    unfolded = unfolded_fake_quant(trained)
    folding = PassManager([FoldQuadapter()])(trained)
    folded = folding.graph_module
    assert not inserted_sites(folded) and not any(k.startswith(SCALE_PREFIX) for k in folded.state_dict())
    assert_equivalent(g.model, folded, g.inputs, tol=TOL)  # quantizers off: still the original model
    converted = ConvertToFakeQuant(weight_spec(8))(folded).graph_module
    # every Linear uses bit-identical quantized weights, and with the activation quantizers off
    # (weights still quantized) the outputs agree to fp32 rounding. (With them on, a value that the
    # fp32 rounding of LN(x; gamma*s, beta*s) vs LN(x)*s moves across a rounding boundary changes
    # by one step; the end-to-end check is the deterministic test below.)
    before, after = _quantizer_and_weight_values(unfolded, g.inputs), _quantizer_and_weight_values(converted, g.inputs)
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    for model in (unfolded, converted):
        for module in model.modules():
            if isinstance(module, (FakeQuantize, TrainableActivationQuantizer)):
                (module.fq if isinstance(module, TrainableActivationQuantizer) else module).enabled = False
    assert_equivalent(unfolded, converted, g.inputs, tol=TOL)


def _quantizer_and_weight_values(gm, inputs):
    """Every Linear's (quantized) weight, by node name."""
    watched = {}
    for node in gm.graph.nodes:
        if node.target is torch.ops.aten.linear.default:
            watched.setdefault(node.args[1], []).append(("weight", node.name))
    values = {}
    probe(gm, watched, ((), inputs), lambda n, v: values.update({key: v for key in watched[n]}))
    return values


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_training_lowers_the_block_error_on_outlier_channels(family):
    g = build_model(family, layers=2, hidden=32, heads=4, batch=3, seq=12, seed=1,
                    outliers=OutlierSpec(gamma_scale=30.0, channels=(3, 17)))
    inserted = InsertQuadapter()(_calibrated(g, "W8A4")).graph_module
    result = TrainQuadapter([g.inputs], max_steps=60, lr=5e-2, progress=False)(inserted)
    plan = result.plan
    assert sum(b.loss_after for b in plan.blocks) < 0.95 * sum(b.loss_before for b in plan.blocks)
    assert "weights unchanged: True" in plan.summary()
    # end to end, quantizers on: the folded model computes what the trained unfolded one did
    folded = ConvertToFakeQuant(weight_spec(8))(FoldQuadapter()(result.graph_module).graph_module).graph_module
    assert_equivalent(unfolded_fake_quant(result.graph_module), folded, g.inputs, tol=1e-5)


def test_smoothquant_init_follows_the_formula():
    g = build_model("gpt2", layers=1, outliers=OutlierSpec(gamma_scale=20.0, channels=(2,)))
    inserted = InsertQuadapter()(_calibrated(g)).graph_module
    alpha = 0.5
    trained = TrainQuadapter([g.inputs], init="smoothquant", alpha=alpha, max_steps=0,
                             progress=False)(inserted).graph_module
    site = inserted_sites(inserted)[0]
    values = {}
    probe(inserted, [site.operand], ((), g.inputs), lambda n, v: values.__setitem__(n, v))
    x_max = values[site.operand].abs().reshape(-1, values[site.operand].shape[-1]).amax(0)
    w_max = torch.stack([fetch_attr(inserted, str(m.args[0].target)).abs().amax(0) for m in site.weight_muls]).amax(0)
    expected = (1 - alpha) * w_max.log() - alpha * x_max.log()
    torch.testing.assert_close(fetch_attr(trained, site.target), expected - expected.mean())


def test_training_and_folding_need_their_inputs():
    g = build_model("llama", layers=1)
    with pytest.raises(PassError, match="InsertQuadapter first"):
        TrainQuadapter([g.inputs], progress=False)(_calibrated(g))
    with pytest.raises(PassError, match="InsertObservers first"):
        InsertQuadapter()(outlierfx.capture(g.model, g.inputs))
    with pytest.raises(ValueError, match="init"):
        TrainQuadapter([g.inputs], init="random")


@pytest.mark.parametrize("recipe", ["quadapter", "os+quadapter"])
def test_quadapter_recipes_run_end_to_end(recipe):
    g = build_model("gpt2", layers=2, outliers=OutlierSpec(gamma_scale=20.0, channels=(3,)), batch=2, seq=10)
    qmodel, report = outlierfx.quantize(g.model, [g.inputs], recipe=recipe, generation=False, progress=False)
    names = [e.pass_name for e in report.audit]
    assert names[-4:] == ["InsertQuadapter", "TrainQuadapter", "FoldQuadapter", "ConvertToFakeQuant"]
    if recipe == "os+quadapter":
        assert names[0] == "MigrateGamma" and "ClipTokenwise" in names
    assert not inserted_sites(qmodel)
    with torch.no_grad():
        assert torch.isfinite(qmodel(**g.inputs).logits).all()


@settings(max_examples=4)
@given(g=transformer_models())
def test_explicit_sites_scale_every_other_linear_input_and_keep_their_multiply(g):
    """``explicit=True`` adds the attention-output and MLP-output projections' inputs (no norm
    before them): exact with quantizers off, and after folding ``x * s`` stays as a constant multiply."""
    observed = _calibrated(g, "W8A4")
    result = PassManager([InsertQuadapter(explicit=True)])(observed)  # the manager checks equivalence
    inserted, plan = result.graph_module, result.audit.entries[0].plan
    explicit = [s for s in plan.sites if s.explicit]
    assert len(plan.sites) - len(explicit) == _expected_sites(g)
    assert len(explicit) == 2 * g.config.num_hidden_layers  # o-proj and down-proj inputs
    assert all(len(s.linears) == 1 and not s.compensated for s in explicit)
    gen = torch.Generator().manual_seed(1)
    for p in scale_parameters(inserted).values():
        p.data = torch.randn(p.shape, generator=gen)
    assert_equivalent(g.model, inserted, g.inputs, tol=TOL)

    trained = TrainQuadapter([g.inputs], init="smoothquant", alpha=0.8, max_steps=10, progress=False)(
        inserted).graph_module
    fold = FoldQuadapter()(trained)
    # under this (full) policy V and the SwiGLU up projection are quantized outputs: the quantizer
    # on the way blocks folding s into their rows (test_explicit_scales_fold_into_upstream_rows)
    assert not fold.plan.into_rows
    assert len(fold.plan.explicit) == len(explicit)
    folded = fold.graph_module
    kept = [n for n in folded.graph.nodes if n.target is torch.ops.aten.mul.Tensor and isinstance(n.args[1], torch.fx.Node)
            and str(n.args[1].target).startswith("outlierfx_quadapter_scale_")]
    assert len(kept) == len(explicit) and not inserted_sites(folded)
    assert all(len(n.users) == 1 and isinstance(folded.get_submodule(str(next(iter(n.users)).target)), Observer)
               for n in kept)  # each multiply feeds its quantizer only
    assert_equivalent(g.model, folded, g.inputs, tol=TOL)
    converted = ConvertToFakeQuant(weight_spec(8))(folded).graph_module
    assert_equivalent(unfolded_fake_quant(trained), converted, g.inputs, tol=1e-4)


@pytest.mark.parametrize(("family", "options", "per_layer"), [
    ("bert", {}, 1),  # V's rows; the GELU output keeps x * s
    ("llama", {}, 2),  # V's rows and SwiGLU's up projection
    ("llama", {"kv_heads": 2}, 1),  # grouped-query V feeds two heads per channel: up projection only
    ("gpt2", {}, 0),  # V is a slice of the fused c_attn output; GELU output
])
def test_explicit_scales_fold_into_upstream_rows_where_channels_map_one_to_one(family, options, per_layer):
    g = build_model(family, layers=2, heads=4, hidden=32, batch=2, seq=10, **options)
    inserted = InsertQuadapter(explicit=True)(_calibrated(g, "W8A8", "linear-inputs")).graph_module
    gen = torch.Generator().manual_seed(3)
    for p in scale_parameters(inserted).values():
        p.data = torch.randn(p.shape, generator=gen)
    fold = PassManager([FoldQuadapter()])(inserted)  # the manager checks the fold is exact
    plan = fold.audit.entries[0].plan
    assert len(plan.into_rows) == per_layer * g.config.num_hidden_layers, plan.summary()
    folded = fold.graph_module
    kept = [n for n in folded.graph.nodes if n.target is torch.ops.aten.mul.Tensor and isinstance(n.args[1], torch.fx.Node)
            and str(n.args[1].target).startswith("outlierfx_quadapter_scale_")]
    assert len(kept) == len(plan.explicit) - len(plan.into_rows)
    assert_equivalent(g.model, folded, g.inputs, tol=TOL)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_smooth_recipe_lowers_every_linear_to_one_int8_gemm(family):
    from outlierfx.graph.compare import output_error
    from outlierfx.passes.lower import Lower

    g = build_model(family, layers=2, outliers=OutlierSpec(gamma_scale=20.0, channels=(3,)), batch=2, seq=10)
    qmodel, report = outlierfx.quantize(g.model, [g.inputs], recipe="smooth", generation=False, progress=False)
    assert report.policy == "linear-inputs"
    assert [e.pass_name for e in report.audit][-3:] == ["FoldQuadapter", "GPTQ", "ConvertToFakeQuant"]
    fold = next(e for e in report.audit if e.pass_name == "FoldQuadapter")
    assert len(fold.plan.explicit) == 2 * g.config.num_hidden_layers
    # V's rows (both are multi-head), and Llama's up projection; BERT's GELU output keeps x * s
    assert len(fold.plan.into_rows) == (2 if family == "llama" else 1) * g.config.num_hidden_layers
    assert all(m.spec.granularity.value == "per_tensor" for m in qmodel.modules() if isinstance(m, FakeQuantize))
    lowered = Lower("reference")(qmodel)
    int8 = [lin for lin in lowered.plan.linears if lin.is_int8]
    assert int8 and not any(lin.kernel.kind is KernelKind.INT8_SUB_GEMMS for lin in lowered.plan.linears)
    with torch.no_grad():  # the explicit x * s runs in float before the quantize step
        assert output_error(qmodel(**g.inputs), lowered.graph_module(**g.inputs)).within(1e-5)
    if "onednn" in torch.backends.quantized.supported_engines:
        eager = Lower("onednn")(qmodel).graph_module
        in_place = [n for n in eager.graph.nodes if n.target is torch.ops.aten.mul_.Tensor]
        # BERT: each GELU output's x * s, and each post-LN compensation, scale their temporary in place
        assert len(in_place) == (3 * g.config.num_hidden_layers if family == "bert" else 0)
        assert_tokens_close(lowered.graph_module, eager, g.inputs)


def test_smooth_fold_keeps_only_scales_that_fold_and_lowers_with_every_fusion():
    from outlierfx.passes.lower import Lower

    g = build_model("bert", layers=2, outliers=OutlierSpec(gamma_scale=20.0, channels=(3,)), batch=2, seq=10)
    qmodel, report = outlierfx.quantize(g.model, [g.inputs], recipe="smooth-fold", progress=False)
    insert = next(e for e in report.audit if e.pass_name == "InsertQuadapter")
    assert any("foldable_only" in why for _, why in insert.plan.skipped)  # the GELU outputs
    fold = next(e for e in report.audit if e.pass_name == "FoldQuadapter")
    layers = g.config.num_hidden_layers
    assert len(fold.plan.explicit) == len(fold.plan.into_rows) == layers  # the attention contexts, into V
    assert not [n for n in qmodel.graph.nodes if n.target is torch.ops.aten.mul.Tensor and isinstance(n.args[1], torch.fx.Node)
                and str(n.args[1].target).startswith("outlierfx_quadapter_scale_")]
    if "onednn" in torch.backends.quantized.supported_engines:
        lowered = Lower("onednn")(qmodel)
        gelu_requantized = Kernel(KernelKind.INT8_GEMM, frozenset({PostOp.GELU, PostOp.REQUANTIZE}))
        assert [lin.kernel for lin in lowered.plan.linears].count(gelu_requantized) == layers
        assert_tokens_close(Lower("reference")(qmodel).graph_module, lowered.graph_module, g.inputs)


def test_phase_two_trains_the_scales_end_to_end_on_the_lm_loss():
    g = build_model("llama", layers=2, outliers=OutlierSpec(gamma_scale=30.0, channels=(3, 17)), batch=2, seq=12)
    inserted = InsertQuadapter()(_calibrated(g, "W8A4")).graph_module
    weights = _tensors(inserted)
    result = TrainQuadapter([g.inputs], max_steps=5, end_to_end_steps=40, end_to_end_lr=5e-2, progress=False)(inserted)
    plan = result.plan
    assert plan.end_to_end_loss == "lm" and len(plan.end_to_end) == 41  # before, then one per step (one batch)
    assert plan.end_to_end[-1] < plan.end_to_end[0] and "phase 2" in plan.summary()
    assert plan.weights_unchanged
    for name, value in _tensors(result.graph_module).items():
        assert torch.equal(value, weights[name]), name


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_smooth_peg_scales_norm_edges_and_groups_the_other_linear_inputs(family):
    """``smooth-peg``: Quadapter at the two norm -> Linear edges of each block, PEG on the two
    Linear inputs no norm produces (attention context, GELU/SwiGLU output); nothing is both."""
    from outlierfx.graph.compare import output_error
    from outlierfx.graph.roles import Role
    from outlierfx.passes.lower import Lower

    g = build_model(family, layers=2, outliers=OutlierSpec(gamma_scale=20.0, channels=(3,)), batch=2, seq=10)
    qmodel, report = outlierfx.quantize(g.model, [g.inputs], recipe="smooth-peg", generation=False, progress=False)
    layers = g.config.num_hidden_layers
    entries = {e.pass_name: e for e in report.audit}
    assert report.policy == "linear-inputs"
    grouped = entries["GroupChannels"].plan.tensors
    # and the head's input, a view of a norm output that Quadapter leaves alone (Llama: the LM
    # head reads a slice of the final norm; BERT: the pooler reads the [CLS] row)
    assert len(grouped) == 2 * layers + 1
    assert all(Role.LINEAR_INPUT in t.roles and Role.NORM_OUTPUT not in t.roles for t in grouped)
    assert len(entries["InsertQuadapter"].plan.sites) == 2 * layers
    assert not any(site.explicit for site in entries["InsertQuadapter"].plan.sites)
    assert {str(s.quantizer.target) for s in entries["InsertQuadapter"].plan.sites}.isdisjoint(
        t.observer for t in grouped)
    per_group = [m for m in qmodel.modules() if isinstance(m, FakeQuantize) and m.spec.granularity.value == "per_group"]
    assert len(per_group) == len(grouped)
    lowered = Lower("reference")(qmodel)
    assert sum(lin.kernel.kind is KernelKind.INT8_SUB_GEMMS for lin in lowered.plan.linears) == len(grouped)
    with torch.no_grad():  # PEG lowering (K int8 sub-GEMMs) computes what the fake-quant model does
        assert output_error(qmodel(**g.inputs), lowered.graph_module(**g.inputs)).within(1e-5)
