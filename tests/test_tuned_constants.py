"""The default preset's constants tuned on MiniLM (issue 25, "no per-model settings"), checked on
generated LayerNorm architectures with injected outliers (docs/choosing.md lists them).

``fast`` on LayerNorm models is ``smooth-fold+sink``; two of its constants came from MiniLM:
the SmoothQuant init's alpha (``SMOOTHQUANT_ALPHA``) and the 1.5x first-token widening rule
(``SPEED_SINK_MIN_WIDENING``). ``rotate+sink`` (RMSNorm decoders) has no tuned constant.
"""

import dataclasses

import pytest
import torch

import outlierfx
from outlierfx.quantizers.observers import FakeQuantize
from outlierfx.recipes import Recipe, get_recipe
from outlierfx.recipes.papers import SMOOTHQUANT_ALPHA, SPEED_SINK_MIN_WIDENING, quadapter_steps
from outlierfx.testing import OutlierSpec, build_model
from outlierfx.testing.equivalence import per_token_output

LAYERNORM_FAMILIES = ("bert", "gpt2", "modernbert")  # where fast takes smooth-fold+sink


def _relative_mse(g, qmodel, skip_first: bool = False) -> float:
    """Output MSE against FP32 over real tokens (without position 0 if ``skip_first``), relative
    to the output's mean square."""
    with torch.no_grad():
        ref, out = per_token_output(g.model(**g.inputs)), per_token_output(qmodel(**g.inputs))
    real = g.inputs["attention_mask"].bool().clone()
    if skip_first:
        real[:, 0] = False
    return float((ref[real] - out[real]).pow(2).mean() / ref[real].pow(2).mean())


@pytest.mark.parametrize("family", LAYERNORM_FAMILIES)
def test_the_first_token_widening_rule_holds_with_a_massive_first_token(family):
    """A first-token grid the rule drops widened its range by less than 1.5x, so sharing it makes
    that site's step at most 1.5x coarser: the other tokens' error stays within 1.5^2 of keeping
    every grid (noise power scales with the step squared), while the rule keeps fewer grids."""
    g = build_model(family, hidden=32, layers=2, batch=4, seq=12,
                    outliers=OutlierSpec(first_token_scale=100.0, gamma_scale=20.0, channels=(3, 17)))
    every = get_recipe("naive+sink")
    rule = dataclasses.replace(every, name="naive+sink (1.5x rule)", sink_min_widening=SPEED_SINK_MIN_WIDENING)
    errors, grids = {}, {}
    for recipe in (every, rule):
        qmodel, _ = outlierfx.quantize(g.model, [g.inputs], recipe=recipe, policy="linear-inputs",
                                       generation=False, progress=False)
        errors[recipe.name] = _relative_mse(g, qmodel, skip_first=True)
        grids[recipe.name] = sum(isinstance(m, FakeQuantize) and m.has_sink_grid for m in qmodel.modules())
    assert grids[rule.name] <= grids[every.name] and grids[every.name] > 0, grids
    assert errors[rule.name] <= SPEED_SINK_MIN_WIDENING ** 2 * errors[every.name], errors


def _smoothquant_init(alpha: float) -> Recipe:
    """smooth-fold's scales at their SmoothQuant init, untrained (as the MiniLM sweep measured)."""
    return Recipe(f"smoothquant-init-{alpha}", "SmoothQuant init only",
                  finish=quadapter_steps(explicit=True, foldable_only=True, init="smoothquant", alpha=alpha,
                                         max_steps=0),
                  default_policy="linear-inputs")


_ALPHA_OPEN = pytest.mark.xfail(strict=True, reason="open: the untrained init at alpha=0.8 is 2% above naive here "
                                                    "(relative MSE 4.08e-6 against 3.99e-6 on BERT, 4.56e-6 against "
                                                    "4.49e-6 on ModernBERT): not shown to hold beyond MiniLM and GPT-2")


@pytest.mark.parametrize("family", [pytest.param("bert", marks=_ALPHA_OPEN), "gpt2",
                                    pytest.param("modernbert", marks=_ALPHA_OPEN)])
def test_the_smoothquant_alpha_helps_on_models_with_outlier_channels(family):
    """alpha=0.8 came from MiniLM; on generated models with injected outlier channels its init
    must still do what it is for: lower the W8A8 error below no scaling (``naive``)."""
    g = build_model(family, hidden=32, layers=2, batch=4, seq=12,
                    outliers=OutlierSpec(gamma_scale=50.0, embedding_scale=20.0, channels=(3, 17)))
    errors = {}
    for recipe in ("naive", _smoothquant_init(SMOOTHQUANT_ALPHA)):
        qmodel, _ = outlierfx.quantize(g.model, [g.inputs], recipe=recipe, policy="linear-inputs",
                                       generation=False, progress=False)
        errors[recipe if isinstance(recipe, str) else recipe.name] = _relative_mse(g, qmodel)
    naive, smoothed = errors["naive"], errors[f"smoothquant-init-{SMOOTHQUANT_ALPHA}"]
    assert smoothed < naive, errors
