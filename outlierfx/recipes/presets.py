"""Presets: the recipe to use for a goal on a backend, chosen from what its kernels run and,
for ``fast``, from the model's structure.

The backend comes first. ``fast`` (the default of :func:`outlierfx.quantize`) keeps only the
transforms that survive lowering as whole int8 GEMMs: per-tensor activation grids, rotations and
scales folded into weights, and a first-token grid only on backends whose kernels run those rows
in int8 at the cost of one small GEMM. Where the residual stream can be rotated exactly (pre-norm
RMSNorm decoders: Llama, Qwen, Mistral...) it takes QuaRot's rotations (``rotate``): no training,
one online Hadamard per FFN. Elsewhere (LayerNorm models: BERT-style encoders, GPT-2) it takes
trained scales folded into norms and weights (``smooth-fold``). The test is structural
(:func:`~outlierfx.passes.rotate_residual.residual_rotation_blockers`), never a model name.
``accurate`` takes the highest-quality recipe measured and pays for it in speed.
Below 8-bit weights ``fast`` also rounds the weights with GPTQ on MSE-clipped rows (a 4-bit grid
is too coarse for round-to-nearest; both only change which codes the weights get, so the kernels
and their speed are the same). docs/choosing.md gives the measurements behind both.
"""

from __future__ import annotations

import dataclasses
import enum

import torch.fx

from ..quantizers.policy import BitWidths
from ..quantizers.spec import Estimator
from .base import Recipe, UnknownRecipeError
from .papers import paper_recipe, with_gptq


class Goal(enum.Enum):
    FAST = "fast"
    ACCURATE = "accurate"


PRESETS = tuple(g.value for g in Goal)


@dataclasses.dataclass(frozen=True)
class Preset:
    goal: Goal
    backend: str
    recipe: Recipe
    why: str


def _first_token_rows_in_int8(backend: str) -> bool:
    """Whether a Linear whose input keeps a first-token grid stays one int8 GEMM (plus at most a
    GEMM of batch x n rows) on ``backend``: onednn, and the reference form inductor compiles; the
    torch.ao engines run it as two full GEMMs, and a backend without the capability in float."""
    from ..backends import FirstTokens, get_backend

    return get_backend(backend).capabilities.first_token_rows not in (FirstTokens.NONE, FirstTokens.TWO_GEMMS)


def preset(goal: str | Goal, backend: str, graph: torch.fx.GraphModule | None = None,
           bits: BitWidths | None = None) -> Preset:
    """The preset for ``goal`` (``fast`` or ``accurate``) on ``backend`` for the captured model
    ``graph`` (None: a model whose residual stream does not rotate) at ``bits`` (None: W8A8),
    with the reason."""
    chosen = _preset_at_8_bits(goal, backend, graph)
    low_bit = chosen.recipe if bits is None or bits.weights >= 8 else _low_bit_weights(chosen.recipe)
    if low_bit == chosen.recipe:
        return chosen
    return dataclasses.replace(chosen, recipe=low_bit, why=(
        f"{chosen.why}; below 8-bit weights every weight row is clipped to its MSE-optimal range on an "
        f"asymmetric grid (all 16 int4 levels, a zero point per row; the int8 kernels run the codes minus the zero "
        f"point) and rounded by GPTQ (the LM head keeps symmetric 8-bit weights), which then gives each Linear's "
        f"output at the first token one float vector: that row's mean error on the calibration texts (the "
        f"attention sink's rows are nearly the same in every text)"))


def _low_bit_weights(recipe: Recipe) -> Recipe:
    """``recipe`` with GPTQ rounding (unless it has it) on MSE-clipped, asymmetric weight rows.
    Measured on SmolLM2 W4A8 (rotate+gptq+sink, docs/experiments/rotation.md): wiki perplexity
    25.81 with min-max rows, 23.30 MSE-clipped, 23.08 with the MSE search weighted by the Gram
    diagonal, 22.59 with those rows asymmetric (16 levels and a zero point instead of 15). GPTQ
    rounds in act order (decreasing Hessian diagonal, its default and the standard GPTQ choice,
    not tuned here): 22.93 in the weights' own column order. Damping 0.1 with least-squares row
    steps gave 22.42 on Wikipedia but 44.12 against 43.57 on news, so GPTQ keeps its defaults.
    GPTQ's first-row corrections (``first_rows``: each Linear's mean first-token error, a constant
    measured on the calibration set, no tuned value) took the lowered model to 22.21 / 43.30
    (docs/experiments/rotation.md, "First-row corrections")."""
    from ..passes.gptq import GPTQ

    if not any(s.pass_type is GPTQ for s in recipe.finish):
        recipe = with_gptq(recipe)
    finish = tuple(dataclasses.replace(s, settings={**s.settings, "first_rows": True}) if s.pass_type is GPTQ else s
                   for s in recipe.finish)
    return dataclasses.replace(recipe, finish=finish, weight_estimator=Estimator.MSE, asymmetric_weights=True)


def _preset_at_8_bits(goal: str | Goal, backend: str, graph: torch.fx.GraphModule | None) -> Preset:
    try:
        goal = Goal(goal)
    except ValueError:
        raise UnknownRecipeError(f"unknown preset {goal!r}; presets: {', '.join(PRESETS)}") from None
    if goal is Goal.ACCURATE:
        return Preset(goal, backend, paper_recipe("smooth-peg+sink"),
                      "the highest quality measured (Quadapter scales at the norms, K=48 PEG groups on the other "
                      "Linear inputs, the first token on its own grid, GPTQ): PEG-grouped Linears run as 48 int8 "
                      "sub-GEMMs, or as float GEMMs on int8 weights where they keep a first-token grid, so it is "
                      "several times slower than 'fast'")
    sink = _first_token_rows_in_int8(backend)
    if graph is not None and _rotatable(graph):
        return Preset(goal, backend, paper_recipe("rotate+sink" if sink else "rotate"),
                      f"the residual stream rotates exactly (RMSNorm pre-norm), so QuaRot's rotations spread the "
                      f"outlier channels at no training cost; every Linear is one int8 GEMM on {backend}, plus one "
                      f"online Hadamard transform before each FFN output Linear"
                      + ("; the first token gets its own grid, for one batch x 1-row GEMM more" if sink else
                         f"; {backend} would run a first-token grid as a second full GEMM, so the first token "
                         f"shares the main grid"))
    if sink:
        return Preset(goal, backend, paper_recipe("smooth-fold+sink"),
                      f"every Linear is one int8 GEMM on {backend} with its GELU/requantization fused (smooth-fold: "
                      "scales folded into norms and weights, none left at run time); the first token gets its own "
                      "grid where it widens a range >= 1.5x, for one batch x 1-row GEMM more on those Linears")
    return Preset(goal, backend, paper_recipe("smooth-fold"),
                  f"every Linear is one int8 GEMM on {backend} with its fusions (smooth-fold: scales folded into "
                  f"norms and weights); {backend} would run a first-token grid as a second full GEMM, so the first "
                  "token shares the main grid")


def _rotatable(graph: torch.fx.GraphModule) -> bool:
    from ..passes.rotate_residual import residual_rotation_blockers

    return not residual_rotation_blockers(graph)
