"""The Hadamard builder and RotateResidual on generated Llama / Qwen2 / Mistral, GPT-2 and BERT."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import outlierfx
from outlierfx.errors import PassError
from outlierfx.graph.attrs import fetch_attr
from outlierfx.graph.probe import probe
from outlierfx.passes import MigrateGamma, PassManager, RotateResidual
from outlierfx.quantizers.hadamard import hadamard
from outlierfx.recipes import Recipe, get_recipe
from outlierfx.recipes.papers import MIGRATE
from outlierfx.testing import DECODER_FAMILIES, OutlierSpec, assert_equivalent, build_model, transformer_models
from outlierfx.testing.architectures import build_architecture

TOL = RotateResidual.output_rel_tol  # 1e-5 of the output's max |value|: fp32 rounding, measured <= 2.6e-6


@pytest.mark.parametrize("d, construction", [(1, "sylvester"), (64, "sylvester"), (12, "paley1(11)"),
                                             (36, "paley2(17)"), (96, "paley1(11) x sylvester"),
                                             (384, "paley1(11) x sylvester"), (576, "paley2(17) x sylvester"),
                                             (28, "paley2(13)"), (7, "random-orthogonal"),
                                             (100, "random-orthogonal")])
def test_rotation_is_orthogonal_and_hadamard_where_one_is_known(d, construction):
    rotation = hadamard(d, seed=5)
    q = rotation.matrix
    assert q.dtype == torch.float64 and q.shape == (d, d) and rotation.construction == construction
    torch.testing.assert_close(q @ q.T, torch.eye(d, dtype=torch.float64), atol=1e-10, rtol=0)
    if rotation.is_hadamard:
        torch.testing.assert_close(q.abs(), torch.full_like(q, d**-0.5), atol=1e-12, rtol=0)
    else:
        assert (q.abs() - d**-0.5).abs().max() > 0.01


def test_the_seed_randomizes_the_rotation_reproducibly():
    torch.testing.assert_close(hadamard(36, 1).matrix, hadamard(36, 1).matrix, atol=0, rtol=0)
    assert not torch.equal(hadamard(36, 1).matrix, hadamard(36, 2).matrix)
    assert not torch.equal(hadamard(7, 1).matrix, hadamard(7, 2).matrix)


def _rotate(g, seed=0):
    gm = outlierfx.capture(g.model, g.inputs)
    migrated = MigrateGamma()(gm).graph_module
    return gm, migrated, RotateResidual(seed=seed)(migrated)


@settings(max_examples=20, deadline=None)
@given(g=transformer_models(families=DECODER_FAMILIES).filter(lambda g: not g.outliers.gamma_zeros),
       seed=st.integers(0, 100))
def test_rotation_is_exact_and_fires_on_rmsnorm_decoders(g, seed):
    _check_rotation_fires(g, *_rotate(g, seed)[1:])


@settings(max_examples=10, deadline=None)
@given(g=transformer_models(families=("gemma",), first_token=True).filter(lambda g: not g.outliers.gamma_zeros),
       seed=st.integers(0, 100))
def test_rotation_is_exact_and_fires_on_gemma(g, seed):
    # Gemma's RMSNorm gain (1 + weight) is the norms' gamma after capture and migrates; its
    # embedding is scaled by sqrt(hidden) before the stream, a scalar the rotation commutes with
    audit = PassManager([MigrateGamma(), RotateResidual(seed=seed)])(outlierfx.capture(g.model, g.inputs)).audit
    norms = 2 * g.config.num_hidden_layers + 1
    assert f"migrated gamma at {norms}/{norms} norm sites" in audit.to_text(), audit.to_text()
    assert "rotated the residual stream" in audit.to_text(), audit.to_text()
    _check_rotation_fires(g, *_rotate(g, seed)[1:])


def _check_rotation_fires(g, migrated, result):
    result.graph_module.graph.lint()
    assert_equivalent(g.model, result.graph_module, g.inputs, tol=TOL)
    plan = result.plan
    layers = g.config.num_hidden_layers
    assert result.modified and plan.applicable and plan.hidden_size == g.config.hidden_size
    assert (len(plan.embeddings), len(plan.writers)) == (1, 2 * layers)
    assert len(plan.readers) == 5 * layers + 1  # q, k, v, gate, up per layer and the lm_head
    for node in plan.writers + plan.readers:
        target = str(node.args[1].target)
        assert not torch.equal(fetch_attr(result.graph_module, target), fetch_attr(migrated, target))


def test_the_pass_manager_checks_the_stated_tolerance_on_a_model_with_massive_activations():
    g = build_model("llama", hidden=64, heads=4, layers=3, bias=True,
                    outliers=OutlierSpec(gamma_scale=200.0, embedding_scale=100.0, channels=(3, 40)))
    gm = outlierfx.capture(g.model, g.inputs)
    result = PassManager([MigrateGamma(), RotateResidual(seed=3)])(gm)
    migrate, rotate = result.audit
    assert migrate.modified and rotate.modified and rotate.error_vs_previous.within(TOL)
    assert_equivalent(g.model, result.graph_module, g.inputs, tol=TOL)
    assert "rotated the residual stream (d=64) by sylvester, seed 3" in rotate.plan.summary()


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_tied_embeddings_stay_tied(family):
    g = build_model(family, tied=True, layers=1)
    gm = outlierfx.capture(g.model, g.inputs)
    embedding = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.embedding.default)
    table = fetch_attr(gm, str(embedding.args[0].target)).detach()
    # a tied table whose final norm has no gamma is still shared: rotated once, E Q for both readers
    result = RotateResidual()(MigrateGamma()(gm).graph_module)
    new = result.graph_module
    embedding = next(n for n in new.graph.nodes if n.target is torch.ops.aten.embedding.default)
    lm_head = [n for n in new.graph.nodes if n.target is torch.ops.aten.linear.default][-1]
    q = hadamard(g.config.hidden_size, 0).matrix
    torch.testing.assert_close(fetch_attr(new, str(embedding.args[0].target)), (table.double() @ q).float())
    head = fetch_attr(new, str(lm_head.args[1].target))
    assert head.shape == table.shape
    if embedding.args[0].target == lm_head.args[1].target:  # untied by MigrateGamma or not, both read E Q
        assert str(embedding.args[0].target) in result.plan.tied
    assert_equivalent(g.model, new, g.inputs, tol=TOL)


def test_a_still_shared_table_is_rotated_once_for_the_embedding_and_the_head():
    g = build_model("llama", tied=True, layers=1)
    with torch.no_grad():
        g.model.model.norm.weight.fill_(1.0)
    gm = outlierfx.capture(g.model, g.inputs)
    norms = [n for n in gm.graph.nodes if n.target is torch.ops.aten.rms_norm.default]
    final = norms[-1]
    final.args = (*final.args[:2], None, *final.args[3:])  # gamma of 1 removed: the head still shares E
    gm.recompile()
    migrated = MigrateGamma()(gm).graph_module
    result = RotateResidual()(migrated)
    new = result.graph_module
    embedding = next(n for n in new.graph.nodes if n.target is torch.ops.aten.embedding.default)
    lm_head = [n for n in new.graph.nodes if n.target is torch.ops.aten.linear.default][-1]
    assert embedding.args[0].target == lm_head.args[1].target
    assert result.plan.tied == (str(embedding.args[0].target),)
    assert_equivalent(g.model, new, g.inputs, tol=TOL)


def test_a_base_model_output_gets_an_explicit_inverse_rotation():
    g = build_model("llama", layers=2, outliers=OutlierSpec(embedding_scale=50.0, channels=(2,)))
    base = g.model.model  # LlamaModel: returns the final norm output as last_hidden_state
    gm = outlierfx.capture(base, g.inputs)
    result = RotateResidual()(MigrateGamma()(gm).graph_module)
    assert len(result.plan.unrotated_outputs) == 1 and "explicit x @ Q^T" in result.plan.summary()
    assert len(result.plan.readers) == 5 * 2  # no lm_head
    assert_equivalent(base, result.graph_module, g.inputs, tol=TOL)


@pytest.mark.parametrize("family, why", [("gpt2", "LayerNorm subtracts the mean"),
                                         ("gpt2", "learned absolute position embeddings"),
                                         ("bert", "post-LN")])
def test_layernorm_models_are_left_unchanged_with_the_reason(family, why):
    g = build_model(family, outliers=OutlierSpec(gamma_scale=50.0, channels=(1,)))
    _, migrated, result = _rotate(g)
    assert not result.modified and not result.plan.applicable
    assert why in result.plan.summary()
    assert result.plan.writers == result.plan.readers == result.plan.embeddings == ()
    assert result.graph_module.code == migrated.code
    for node in result.graph_module.graph.nodes:
        if node.op == "get_attr":
            assert torch.equal(fetch_attr(result.graph_module, node.target), fetch_attr(migrated, node.target))


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
def test_sandwich_norms_keep_the_stream_unrotated_with_the_reason(model_type):
    # Gemma-2/3 normalize each sublayer's output before the residual add: the pre-norms' gain
    # (1 + weight) migrates, but a gain on the stream's writer cannot move, nor commute with Q
    g = build_architecture(model_type)
    gm = outlierfx.capture(g.model, g.inputs)
    migrated = MigrateGamma()(gm)
    layers = g.config.num_hidden_layers
    assert len(migrated.plan.migrations) == 2 * layers + 1  # input and pre-feedforward norms, final norm
    result = RotateResidual()(migrated.graph_module)
    assert not result.modified and len(result.plan.blockers) == 2 * layers
    assert all("a norm writes the stream" in why for _, why in result.plan.blockers)
    assert_equivalent(g.model, migrated.graph_module, g.inputs, tol=TOL)


def test_gamma_left_in_a_norm_is_refused_with_the_fix():
    g = build_model("llama", layers=1)
    gm = outlierfx.capture(g.model, g.inputs)
    with pytest.raises(PassError, match=r"run MigrateGamma\(\) first"):
        RotateResidual()(gm)


def _max_over_rms(gm, inputs):
    """Per norm output: the largest |x| over the tokens' rms (how much one channel dominates)."""
    norms = [n for n in gm.graph.nodes if n.target is torch.ops.aten.rms_norm.default]
    ratios = []
    probe(gm, norms, ((), inputs), lambda n, v: ratios.append(
        float((v.abs().amax(-1) / v.pow(2).mean(-1).sqrt()).max())))
    return ratios


def test_rotation_spreads_outlier_channels_of_the_norm_outputs():
    g = build_model("llama", hidden=64, heads=4, layers=2, outliers=OutlierSpec(embedding_scale=100.0, channels=(3,)))
    _, migrated, result = _rotate(g)
    before, after = _max_over_rms(migrated, g.inputs), _max_over_rms(result.graph_module, g.inputs)
    assert max(before) > 6.0  # channel 3 carries most of the norm: max/rms near sqrt(64) = 8
    assert all(a < b / 2 for a, b in zip(after, before)), (before, after)


def test_the_input_graph_and_model_are_never_touched():
    g = build_model("llama", tied=True, outliers=OutlierSpec(gamma_scale=20.0, embedding_scale=20.0, channels=(1,)))
    state = {k: v.clone() for k, v in g.model.state_dict().items()}
    gm = MigrateGamma()(outlierfx.capture(g.model, g.inputs)).graph_module
    params = {k: v.clone() for k, v in gm.state_dict().items()}
    RotateResidual()(gm)
    assert all(torch.equal(v, gm.state_dict()[k]) for k, v in params.items())
    assert all(torch.equal(v, g.model.state_dict()[k]) for k, v in state.items())


def test_the_rotate_recipe_and_its_suffixes():
    recipe = get_recipe("rotate")
    assert [s.name for s in recipe.prepare] == ["MigrateGamma", "RotateResidual", "RotateHeads", "RotateFFN"]
    assert recipe.default_policy == "linear-inputs"
    assert [s.name for s in get_recipe("rotate+sink+gptq").finish] == ["GPTQ"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_residual_rotation_quantizes_with_less_error_than_gamma_migration_alone(seed):
    # fake quant (simulated W8A8), per-tensor activations on every Linear input for both; the
    # outliers are injected into the residual stream (gamma, embedding), which RotateResidual
    # spreads (the head and FFN rotations of the full recipe are measured on SmolLM2)
    g = build_model("llama", hidden=64, heads=4, layers=2, seed=seed,
                    outliers=OutlierSpec(gamma_scale=20.0, embedding_scale=100.0, channels=(3, 17)))
    migrate_only = Recipe("migrate", "gamma migration alone", prepare=(MIGRATE,), default_policy="linear-inputs")
    rotate = get_recipe("rotate")
    residual_only = dataclasses.replace(rotate, name="rotate", prepare=rotate.prepare[:2])
    reference = g.model(**g.inputs).logits
    errors = {}
    for recipe in (migrate_only, residual_only):
        qmodel, report = outlierfx.quantize(g.model, [g.inputs], recipe=recipe, bits="W8A8",
                                            generation=False, progress=False)
        errors[report.recipe] = float((qmodel(**g.inputs).logits - reference).abs().max() / reference.abs().max())
    assert errors["rotate"] < errors["migrate"], errors
    assert [(e.pass_name, e.modified) for e in report.audit][:2] == [("MigrateGamma", True), ("RotateResidual", True)]


@settings(max_examples=10, deadline=None)
@given(g=transformer_models(families=DECODER_FAMILIES).filter(lambda g: not g.outliers.gamma_zeros),
       seed=st.integers(0, 100))
def test_a_given_orthogonal_matrix_is_folded_exactly(g, seed):
    # a rotation learned offline (SpinQuant's R1): any orthogonal Q is exact, not only a Hadamard
    d = g.config.hidden_size
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    gm = outlierfx.capture(g.model, g.inputs)
    migrated = MigrateGamma()(gm).graph_module
    result = RotateResidual(matrix=q.float())(migrated)
    _check_rotation_fires(g, migrated, result)
    assert "by a given orthogonal matrix" in result.plan.summary()
    embedding = next(n for n in result.graph_module.graph.nodes if n.target is torch.ops.aten.embedding.default)
    table = fetch_attr(migrated, str(embedding.args[0].target)).double()
    torch.testing.assert_close(fetch_attr(result.graph_module, str(embedding.args[0].target)),
                               (table @ q.float().double()).float())


def test_a_given_matrix_that_is_not_orthogonal_or_does_not_fit_is_refused():
    with pytest.raises(PassError, match="not orthogonal"):
        RotateResidual(matrix=torch.eye(8) * 1.01)
    with pytest.raises(PassError, match="square"):
        RotateResidual(matrix=torch.ones(8, 4))
    g = build_model("llama", hidden=64, heads=4, layers=1)
    migrated = MigrateGamma()(outlierfx.capture(g.model, g.inputs)).graph_module
    with pytest.raises(PassError, match="32 x 32, but the residual stream is 64 wide"):
        RotateResidual(matrix=hadamard(32, 0).matrix)(migrated)
