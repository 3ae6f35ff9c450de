"""DetectNorms and MigrateGamma on generated BERT (post-LN), GPT-2 (pre-LN) and Llama (RMSNorm), and
on ModernBERT, Qwen2 and Gemma with a massive first token."""

import pytest
import torch
from hypothesis import given, settings

import outlierfx
from outlierfx.graph import meta
from outlierfx.graph.attrs import fetch_attr
from outlierfx.graph.probe import probe
from outlierfx.passes import PassManager
from outlierfx.passes.detect_norms import DetectNorms, NormPlacement
from outlierfx.passes.migrate_gamma import MigrateGamma
from outlierfx.testing import MORE_FAMILIES, OutlierSpec, assert_equivalent, build_model, transformer_models

TOL = 1e-5  # of the output's max |value|: migration is exact up to fp32 rounding


def _norm_outputs(gm, inputs):
    norms = [n for n in gm.graph.nodes if n.target in (torch.ops.aten.layer_norm.default, torch.ops.aten.rms_norm.default)]
    values = {}
    probe(gm, norms, ((), inputs), lambda n, v: values.__setitem__(n.name, v.clone()))
    return values


def _norms_in_float64(gm, inputs):
    """Each norm of ``gm`` recomputed in float64 from its recorded fp32 input: the exact value
    its fp32 output rounds. A norm whose input carries a 200x outlier channel subtracts a large
    mean, so fp32 is off by more than any fixed tolerance there; the test measures by how much."""
    norms = [n for n in gm.graph.nodes if n.target in (torch.ops.aten.layer_norm.default, torch.ops.aten.rms_norm.default)]
    seen = {}
    probe(gm, [n.args[0] for n in norms], ((), inputs), lambda n, v: seen.__setitem__(n, v.clone()))
    exact = {}
    for norm in norms:
        x, shape, weight, *rest = norm.args
        weight = None if weight is None else fetch_attr(gm, str(weight.target)).double()
        if norm.target is torch.ops.aten.layer_norm.default:
            bias = None if rest[0] is None else fetch_attr(gm, str(rest[0].target)).double()
            exact[norm.name] = torch.nn.functional.layer_norm(seen[x].double(), shape, weight, bias, rest[1])
        else:
            exact[norm.name] = torch.nn.functional.rms_norm(seen[x].double(), shape, weight, rest[0] if rest else None)
    return exact


def _gamma_outlier_models():
    return transformer_models().filter(lambda g: g.outliers.gamma_scale > 1 or g.outliers.gamma_zeros)


@settings(max_examples=40)
@given(g=transformer_models())
def test_migration_is_exact_and_fires_on_every_absorbable_site(g):
    _check_migration(g)


@settings(max_examples=12)
@given(g=transformer_models(families=(*MORE_FAMILIES, "mistral"), first_token=True))
def test_migration_is_exact_beyond_bert_gpt2_llama(g):
    _check_migration(g)


def _check_migration(g):
    gm = outlierfx.capture(g.model, g.inputs)
    detected = DetectNorms()(gm).plan
    result = MigrateGamma()(gm)
    result.graph_module.graph.lint()
    assert_equivalent(g.model, result.graph_module, g.inputs, tol=TOL)

    plan = result.plan
    migrated = {m.site.norm.name for m in plan.migrations}
    absorbable = {s.norm.name for s in detected.sites if s.absorbable}
    assert migrated == absorbable and result.modified == bool(absorbable)
    # these architectures have no blocking consumer; Gemma's gain (1 + weight) is the norm's
    # gamma after capture (canonicalize.fold_norm_gain), so it migrates too
    assert len(absorbable) == len(detected.sites)
    for name, tensor in list(result.graph_module.named_parameters()) + list(result.graph_module.named_buffers()):
        assert torch.isfinite(tensor).all(), name


@settings(max_examples=25)
@given(g=_gamma_outlier_models())
def test_norm_output_no_longer_carries_gamma(g):
    gm = outlierfx.capture(g.model, g.inputs)
    result = MigrateGamma()(gm)
    before, after = _norm_outputs(gm, g.inputs), _norm_outputs(result.graph_module, g.inputs)
    exact = _norms_in_float64(gm, g.inputs)
    for m in result.plan.migrations:
        name = m.site.norm.name
        gamma = fetch_attr(gm, str(m.site.gamma.target)).detach()
        zeros = set(torch.nonzero(gamma == 0).flatten().tolist())
        assert zeros <= set(m.kept_channels)  # never divides by zero
        moved = torch.ones_like(gamma, dtype=torch.bool)
        moved[list(m.kept_channels)] = False
        # migrated channels: LN'(x) * gamma == LN(x), as closely as fp32 computes LN(x) itself
        # (within 1e-4, or 4x the fp32 norm's own distance from float64 where that is larger)
        truth = exact[name][..., moved]
        noise = float((before[name][..., moved].double() - truth).abs().max())
        error = (after[name][..., moved].double() * gamma[moved].double() - truth).abs()
        assert ((error <= 1e-4 + 1e-4 * truth.abs()) | (error <= 4.0 * noise)).all(), (name, float(error.max()), noise)
        torch.testing.assert_close(after[name][..., ~moved], before[name][..., ~moved])  # kept channels unchanged


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_outlier_gamma_channels_shrink(family):
    spec = OutlierSpec(gamma_scale=200.0, channels=(5,))
    g = build_model(family, outliers=spec, hidden=32, heads=4)
    gm = outlierfx.capture(g.model, g.inputs)
    result = MigrateGamma()(gm)
    before, after = _norm_outputs(gm, g.inputs), _norm_outputs(result.graph_module, g.inputs)
    for name in before:
        assert after[name][..., 5].abs().max() < before[name][..., 5].abs().max() / 20


def test_post_ln_shortcut_and_output_get_explicit_multiplies():
    g = build_model("bert", layers=2)
    result = MigrateGamma()(outlierfx.capture(g.model, g.inputs))
    muls = [n for n in result.graph_module.graph.nodes
            if n.target is torch.ops.aten.mul.Tensor and n.meta.get(meta.CREATED_BY) == "MigrateGamma"]
    assert len(muls) == 5  # 4 residual shortcuts + the last hidden state output
    assert all(m.site.placement in (NormPlacement.POST_LN, NormPlacement.FINAL) for m in result.plan.migrations)


def test_pre_ln_needs_no_multiply_and_unties_the_lm_head():
    g = build_model("llama", tied=True, layers=1)
    gm = outlierfx.capture(g.model, g.inputs)
    result = MigrateGamma()(gm)
    new = result.graph_module
    assert not [n for n in new.graph.nodes if n.meta.get(meta.CREATED_BY) == "MigrateGamma" and n.op == "call_function"]
    final = result.plan.migrations[-1]
    assert final.tied_weights == ("model.embed_tokens.weight",) or final.tied_weights == ("lm_head.weight",)
    embedding = next(n for n in new.graph.nodes if n.target is torch.ops.aten.embedding.default)
    lm_head = [n for n in new.graph.nodes if n.target is torch.ops.aten.linear.default][-1]
    assert embedding.args[0] is not lm_head.args[1]  # the embedding keeps the original table
    torch.testing.assert_close(fetch_attr(new, str(embedding.args[0].target)), g.model.get_input_embeddings().weight)
    assert_equivalent(g.model, new, g.inputs, tol=TOL)


def test_pass_never_touches_the_input_graph_or_model():
    g = build_model("gpt2", outliers=OutlierSpec(gamma_scale=50.0, channels=(1,)))
    state = {k: v.clone() for k, v in g.model.state_dict().items()}
    gm = outlierfx.capture(g.model, g.inputs)
    params = {k: v.clone() for k, v in gm.state_dict().items()}
    MigrateGamma()(gm)
    assert all(torch.equal(v, gm.state_dict()[k]) for k, v in params.items())
    assert all(torch.equal(v, g.model.state_dict()[k]) for k, v in state.items())


def test_a_norm_with_a_nonlinear_consumer_is_left_alone_with_a_reason():
    class NormThenTanh(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.proj = torch.nn.LayerNorm(8), torch.nn.Linear(8, 8)

        def forward(self, x):
            h = self.norm(x)
            return self.proj(h) + torch.tanh(h)

    gm = outlierfx.capture(NormThenTanh(), (torch.randn(2, 3, 8),))
    result = MigrateGamma()(gm)
    assert not result.modified and not result.plan.migrations
    (norm, reason), = result.plan.skipped
    assert "tanh" in reason and "cannot absorb" in reason


def test_a_norm_without_gamma_is_skipped():
    model = torch.nn.Sequential(torch.nn.LayerNorm(8, elementwise_affine=False), torch.nn.Linear(8, 4))
    result = MigrateGamma()(outlierfx.capture(model, (torch.randn(2, 8),)))
    assert not result.modified and "no gamma" in result.plan.skipped[0][1]


def test_amplifying_mode_keeps_damping_channels():
    g = build_model("llama", outliers=OutlierSpec(gamma_scale=50.0, channels=(3,)), layers=1)
    gm = outlierfx.capture(g.model, g.inputs)
    plan = MigrateGamma(channels="amplifying")(gm).plan
    for m in plan.migrations:
        gamma = fetch_attr(gm, str(m.site.gamma.target))
        moved = set(range(gamma.numel())) - set(m.kept_channels)
        assert moved == set(torch.nonzero(gamma.abs() > 1).flatten().tolist())
    assert_equivalent(g.model, MigrateGamma(channels="amplifying")(gm).graph_module, g.inputs, tol=TOL)


def test_invalid_options_are_rejected():
    with pytest.raises(ValueError, match="channels must be"):
        MigrateGamma(channels="bad")
    with pytest.raises(ValueError, match="min_gamma_ratio"):
        MigrateGamma(min_gamma_ratio=2.0)


def test_pass_manager_audit_for_migration():
    g = build_model("bert")
    result = PassManager([DetectNorms(), MigrateGamma()])(outlierfx.capture(g.model, g.inputs))
    detect, migrate = result.audit.entries
    assert not detect.modified and migrate.modified
    assert "migrated gamma at 5/5 norm sites" in result.audit.to_text()
    assert migrate.error_vs_reference.max_rel <= TOL
