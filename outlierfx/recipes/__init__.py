"""Recipes as data, the papers' recipes by name, and the presets chosen per backend.

``choose(recipe, backend)`` is what :func:`outlierfx.quantize` uses to turn its arguments into
one recipe and one target: no recipe (or ``"fast"``/``"accurate"``) means a preset for the
backend, which defaults to this CPU's best; a paper recipe or a :class:`Recipe` object is taken
as given, simulated unless a backend is named.
"""

from __future__ import annotations

import torch.fx

from ..quantizers.policy import BitWidths
from .base import Need, Recipe, RecipeError, RunContext, Stage, Step, UnknownRecipeError, step
from .fit import BackendFit, backend_fit
from .papers import (
    FINE_SUFFIX,
    GPTQ_SUFFIX,
    RECIPES,
    SINK_SUFFIX,
    SPEED_SINK_MIN_WIDENING,
    paper_recipe,
    quadapter_recipe,
    with_fine_stage,
    with_gptq,
    with_sink_token,
)
from .presets import PRESETS, Goal, Preset, preset
from .runner import RecipeRun, run_recipe

SIMULATED = "fake-quant"  # backend name for the simulated (fake-quant) model

__all__ = ["FINE_SUFFIX", "GPTQ_SUFFIX", "PRESETS", "RECIPES", "SIMULATED", "SINK_SUFFIX", "SPEED_SINK_MIN_WIDENING",
           "BackendFit", "Goal", "Need", "Preset", "Recipe", "RecipeError", "RecipeRun", "RunContext", "Stage", "Step",
           "UnknownRecipeError", "backend_fit", "choose", "get_recipe", "paper_recipe", "preset", "quadapter_recipe",
           "run_recipe", "step", "with_fine_stage", "with_gptq", "with_sink_token"]


def get_recipe(recipe: str | Recipe, backend: str | None = None, graph: torch.fx.GraphModule | None = None) -> Recipe:
    """A recipe object from a preset name (resolved for ``backend``, default this CPU's best, and
    the captured model ``graph``), a paper recipe name with suffixes, or a :class:`Recipe`
    (returned as is)."""
    return choose(recipe, backend, graph)[0]


def choose(recipe: str | Recipe | None, backend: str | None, graph: torch.fx.GraphModule | None = None,
           bits: BitWidths | None = None) -> tuple[Recipe, str | None, Preset | None]:
    """``(recipe, target backend or None for simulation, the preset if one was chosen)``; a
    preset is resolved for the captured model ``graph`` at ``bits`` (see :mod:`.presets`)."""
    from ..backends import check_backend, default_backend

    if isinstance(recipe, Recipe):
        return recipe, _target(backend), None
    if recipe is not None and not isinstance(recipe, str):
        raise RecipeError(f"recipe must be a name or an outlierfx.recipes.Recipe, not {type(recipe).__name__}")
    if recipe is None or recipe in PRESETS:
        target = _target(backend) if backend is not None else check_backend(default_backend())
        chosen = preset(recipe or Goal.FAST.value, target or default_backend(), graph, bits)
        return chosen.recipe, target, chosen
    return paper_recipe(recipe), _target(backend), None


def _target(backend: str | None) -> str | None:
    from ..backends import check_backend

    return None if backend is None or backend == SIMULATED else check_backend(backend)
