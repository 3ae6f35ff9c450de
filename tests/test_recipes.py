"""Recipes as data: validation of composition, data handed to passes by the runner, presets
chosen per backend, the backend checked before calibration, and reports tied to their model."""

import dataclasses
import warnings

import pytest
import torch

import outlierfx
from outlierfx.errors import DataError, OutlierFXWarning
from outlierfx.graph import meta
from outlierfx.passes.calibrate import CalibrationPlan
from outlierfx.passes.clip_tokenwise import ClipTokenwise
from outlierfx.passes.group_channels import GroupChannels
from outlierfx.passes import FoldQuadapter, InsertQuadapter
from outlierfx.quantizers.observers import Observer
from outlierfx.quantizers.policy import make_policy
from outlierfx.recipes import (
    PRESETS,
    RECIPES,
    Recipe,
    RecipeError,
    RunContext,
    UnknownRecipeError,
    get_recipe,
    preset,
    step,
)
from outlierfx.recipes.papers import CLIP
from outlierfx.testing.models import OutlierSpec, build_model


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_registered_recipe_is_valid_and_describes_its_stages(name):
    recipe = RECIPES[name]
    recipe.validate()
    text = recipe.describe()
    assert text.startswith(f"{name}: ") and "[InsertObservers]" in text and "[Calibrate]" in text
    for _, s in recipe.steps:
        assert s.name in text


@pytest.mark.parametrize("name, repeated", [("smooth+gptq", "GPTQ"), ("best+gptq", "GPTQ"),
                                            ("peg+lsq+gptq+gptq", "GPTQ"), ("os+lsq+lsq", "LearnRanges")])
def test_a_suffix_that_repeats_a_pass_is_refused(name, repeated):
    with pytest.raises(RecipeError, match=f"runs {repeated} twice"):
        get_recipe(name)


def test_sink_applies_once_and_chained_suffixes_still_work():
    with pytest.raises(RecipeError, match="'\\+sink' applies once"):
        get_recipe("naive+sink+sink")
    chained = get_recipe("os+lsq+gptq")
    assert [s.name for s in chained.finish] == ["ClipTokenwise", "LearnRanges", "GPTQ"]
    with pytest.raises(UnknownRecipeError, match="unknown recipe 'nope\\+gptq'"):
        get_recipe("nope+gptq")


def test_a_pass_in_the_wrong_stage_or_before_what_it_builds_on_is_refused():
    with pytest.raises(RecipeError, match="GroupChannels belongs to the observe stage"):
        Recipe("bad", "test", finish=(step(GroupChannels, groups=6),))
    with pytest.raises(RecipeError, match="FoldQuadapter builds on InsertQuadapter"):
        Recipe("bad", "test", finish=(step(FoldQuadapter), step(InsertQuadapter)))
    with pytest.raises(RecipeError, match="not a Step"):
        Recipe("bad", "test", finish=(ClipTokenwise,))


def test_a_setting_the_runner_supplies_is_refused_in_the_recipe():
    from outlierfx.recipes import quadapter_recipe

    with pytest.raises(RecipeError, match="TrainQuadapter: progress is supplied by the runner"):
        quadapter_recipe("q", progress=False)


def test_the_runner_hands_data_to_the_passes_that_need_it():
    batches = [{"input_ids": torch.ones(1, 4, dtype=torch.long)}]
    built = CLIP.build(RunContext(batches, make_policy("full"), progress=True))
    assert isinstance(built, ClipTokenwise) and built.batches == batches and built.progress
    gptq = get_recipe("best").finish[-1]
    with pytest.raises(RecipeError, match="GPTQ works on quantized Linear weights.*keeps them float"):
        gptq.build(RunContext(batches, dataclasses.replace(make_policy("full"), weight=None)))


def test_quantize_takes_a_recipe_object_and_audits_calibration():
    g = build_model("gpt2", hidden=16, layers=1)
    k1 = Recipe("k1", "PEG with one group: the same grid as per tensor", observe=(step(GroupChannels, groups=1),))
    qmodel, report = outlierfx.quantize(g.model, [g.inputs, g.inputs], recipe=k1, generation=False, progress=False)
    naive, _ = outlierfx.quantize(g.model, [g.inputs, g.inputs], recipe="naive", generation=False, progress=False)
    assert report.recipe == "k1" and report.backend == "fake-quant"
    names = [e.pass_name for e in report.audit]
    assert names == ["InsertObservers", "GroupChannels", "Calibrate", "ConvertToFakeQuant"]
    plan = report.audit.entries[2].plan
    assert isinstance(plan, CalibrationPlan) and plan.batches == 2 and plan.observers > 0
    assert plan.tokens == 2 * int(g.inputs["attention_mask"].sum())
    with torch.no_grad():
        assert torch.allclose(qmodel(**g.inputs).logits, naive(**g.inputs).logits, atol=1e-5)


def test_calibration_leaves_the_graph_it_was_given_untouched():
    from outlierfx.passes import PassManager
    from outlierfx.passes.calibrate import Calibrate
    from outlierfx.passes.insert_observers import InsertObservers

    g = build_model("bert", layers=1)
    prepared = PassManager([InsertObservers("full")])(outlierfx.capture(g.model, g.inputs)).graph_module
    calibrated = Calibrate([g.inputs])(prepared).graph_module
    assert all(not m.calibrated for m in prepared.children() if isinstance(m, Observer))
    assert all(m.calibrated for m in calibrated.children() if isinstance(m, Observer))


@pytest.mark.parametrize("backend", ["onednn", "inductor", "reference", "x86", "qnnpack"])
def test_presets_are_chosen_from_what_the_backend_runs_and_the_model_structure(backend):
    first_rows = backend in ("onednn", "inductor", "reference")
    sink = "+sink" if first_rows else ""
    encoder, decoder, gpt2 = (build_model(f, layers=1) for f in ("bert", "llama", "gpt2"))
    graphs = {name: outlierfx.capture(g.model, g.inputs) for name, g in
              (("bert", encoder), ("llama", decoder), ("gpt2", gpt2))}
    for fast in (preset("fast", backend), preset("fast", backend, graphs["bert"]), preset("fast", backend, graphs["gpt2"])):
        assert fast.recipe.name == "smooth-fold" + sink  # LayerNorm: the residual stream does not rotate
        assert backend in fast.why and "one int8 GEMM" in fast.why
    rotated = preset("fast", backend, graphs["llama"])
    assert rotated.recipe.name == "rotate" + sink
    assert "rotates exactly" in rotated.why and backend in rotated.why and "one int8 GEMM" in rotated.why
    assert preset("accurate", backend, graphs["llama"]).recipe.name == "smooth-peg+sink"
    assert set(PRESETS) == {"fast", "accurate"}
    with pytest.raises(UnknownRecipeError, match="unknown preset 'fastest'"):
        preset("fastest", backend)


def test_quantize_with_no_recipe_lowers_the_fast_preset_and_says_why():
    from outlierfx.backends import default_backend

    g = build_model("bert", layers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OutlierFXWarning)  # the preset runs every Linear as one int8 GEMM
        qmodel, report = outlierfx.quantize(g.model, [g.inputs], progress=False)
    backend = default_backend()
    assert report.preset == "fast" and report.backend == backend
    chosen = preset("fast", backend, outlierfx.capture(g.model, g.inputs))
    assert report.recipe == chosen.recipe.name and report.why == chosen.why
    assert report.backend_fit.whole_int8
    assert report.backend_fit.linears == sum(isinstance(m, torch.nn.Linear) for m in g.model.modules())
    assert report.audit.entries[-1].pass_name == "Lower" and "preset fast" in report.headline()
    with torch.no_grad():
        ref, out = g.model(**g.inputs).last_hidden_state, qmodel(**g.inputs).last_hidden_state
    assert torch.nn.functional.cosine_similarity(ref.flatten(), out.flatten(), dim=0) > 0.99
    simulated, sim_report = outlierfx.quantize(g.model, [g.inputs], backend="fake-quant", progress=False)
    assert sim_report.backend == "fake-quant" and sim_report.preset == "fast"


def test_a_recipe_the_backend_cannot_run_as_whole_gemms_is_flagged_before_calibration():
    from outlierfx.backends import default_backend

    g = build_model("llama", layers=1)
    embeds = g.model.get_input_embeddings()(g.inputs["input_ids"]).detach()
    good = {"inputs_embeds": embeds, "attention_mask": g.inputs["attention_mask"]}
    bad = dict(good, inputs_embeds=embeds.index_fill(1, torch.tensor([0]), float("nan")))
    backend = default_backend()
    with pytest.warns(OutlierFXWarning, match=f"Linears will not run as one int8 GEMM on {backend}.*sub-GEMMs") as got:
        with pytest.raises(DataError, match="NaN"):  # calibration fails after the warning was given
            outlierfx.quantize(g.model, [good, bad], recipe="peg", backend=backend, generation=False, progress=False)
    assert {w.filename for w in got} == {__file__}  # the warning points at the caller's line


def test_lower_refuses_a_report_from_another_run():
    g = build_model("bert", layers=1)
    naive, naive_report = outlierfx.quantize(g.model, [g.inputs], recipe="naive", progress=False)
    peg, _ = outlierfx.quantize(g.model, [g.inputs], recipe="peg", progress=False)
    with pytest.raises(DataError, match="report \\(recipe 'naive'\\) was not made with this model"):
        outlierfx.lower(peg, naive_report, "reference")
    lowered, report = outlierfx.lower(naive, naive_report, "reference")
    assert report.backend == "reference" and report.audit.entries[-1].pass_name == "Lower"


def test_the_default_on_an_rmsnorm_decoder_is_the_rotation_preset_and_runs_whole_int8_gemms():
    from outlierfx.backends import default_backend
    from outlierfx.graph.hadamard_op import HADAMARD
    from outlierfx.graph.ops import is_call

    g = build_model("qwen2", hidden=64, heads=4, layers=2, ffn=96, seq=12,
                    outliers=OutlierSpec(gamma_scale=50.0, embedding_scale=20.0, channels=(5,)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", OutlierFXWarning)  # the preset runs every Linear as one int8 GEMM
        qmodel, report = outlierfx.quantize(g.model, [g.inputs], progress=False)
    assert report.preset == "fast" and report.recipe.startswith("rotate") and report.backend_fit.whole_int8
    fired = {e.pass_name for e in report.audit.entries if e.modified}
    assert {"MigrateGamma", "RotateResidual", "RotateHeads", "RotateFFN"} <= fired
    assert sum(is_call(n, HADAMARD) for n in report.graphs.simulated.graph.nodes) == 2
    with torch.no_grad():
        ref, out = g.model(**g.inputs).logits, qmodel(**g.inputs).logits
    assert torch.nn.functional.cosine_similarity(ref.flatten(), out.flatten(), dim=0) > 0.99
    assert report.backend == default_backend()


def test_below_8_bit_weights_the_fast_preset_rounds_asymmetric_mse_clipped_rows_with_gptq():
    from outlierfx.backends import default_backend
    from outlierfx.quantizers.policy import parse_bits
    from outlierfx.quantizers.spec import Estimator

    g = build_model("llama", layers=1)
    graph = outlierfx.capture(g.model, g.inputs)
    at8, at4 = preset("fast", "onednn", graph, parse_bits("W8A8")), preset("fast", "onednn", graph, parse_bits("W4A8"))
    assert at8 == preset("fast", "onednn", graph)
    assert at4.recipe.name == "rotate+sink+gptq" and at4.recipe.weight_estimator is Estimator.MSE
    assert "GPTQ" in at4.why and at4.why.startswith(at8.why)
    # int4 rows on the asymmetric grid (16 levels, a zero point per row); 8-bit rows stay symmetric
    assert not at4.recipe.policy(parse_bits("W4A8")).weight.symmetric
    assert at4.recipe.policy(parse_bits("W8A8")).weight.symmetric
    smooth8, smooth4 = preset("fast", "onednn", None), preset("fast", "onednn", None, parse_bits("W4A8"))
    # already GPTQ on MSE rows: only the rows' grid changes, and GPTQ corrects the first-token rows
    from outlierfx.passes.gptq import GPTQ

    corrected = tuple(dataclasses.replace(s, settings={**s.settings, "first_rows": True}) if s.pass_type is GPTQ else s
                      for s in smooth8.recipe.finish)
    assert smooth4.recipe == dataclasses.replace(smooth8.recipe, asymmetric_weights=True, finish=corrected)
    assert [s.settings.get("first_rows") for s in at4.recipe.finish if s.pass_type is GPTQ] == [True]
    qmodel, report = outlierfx.quantize(g.model, [g.inputs], bits="W4A8", generation=False, progress=False)
    assert report.recipe == "rotate+sink+gptq" and report.backend == default_backend()
    assert any(e.pass_name == "GPTQ" and e.modified for e in report.audit.entries)
    # the int4 rows run as int8 codes (k - zero point): whole int8 GEMMs computing the simulation
    simulated = report.graphs.simulated
    grids = {(n.meta[meta.WEIGHT_QUANT].bits, n.meta[meta.WEIGHT_QUANT].symmetric)
             for n in simulated.graph.nodes if meta.WEIGHT_QUANT in n.meta}
    assert grids == {(4, False), (8, True)}, grids  # the LM head and the table symmetric 8-bit
    assert report.backend_fit.whole_int8
    with torch.no_grad():
        expected, out = simulated(**g.inputs).logits, qmodel(**g.inputs).logits
    assert torch.nn.functional.cosine_similarity(expected.flatten(), out.flatten(), dim=0) > 0.9999
