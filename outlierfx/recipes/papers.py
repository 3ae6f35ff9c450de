"""The named recipes: the three papers' methods, their ablations, and the measured combinations.

They keep their names for research and audit; users who want a model to run pick a preset
(:mod:`outlierfx.recipes.presets`). docs/passes.md maps each paper to its passes.

- ``naive``: plain PTQ, per-tensor min-max activations, per-channel symmetric weights.
- ``mp16``: ``naive`` with the FFN input/output and residual sums at 16 bit (W8A{8,16}).
- ``os``: Outlier Suppression: gamma migration, then token-wise clipping.
- ``peg``: per-embedding-group quantization (K=6, sorted channels) of the FFN input/output and
  residual sums; ``os+peg`` both; ``clip``, ``peg+clip``: ablations (clipping without migration).
- ``quadapter``: learned per-channel scales at the norm -> Linear edges (Park et al. 2022),
  trained block by block on the calibration batches, then folded; ``os+quadapter`` after gamma
  migration and token-wise clipping.
- ``qat``: ``naive`` ranges, then quantization-aware training of the Linear weights: the
  baseline of Quadapter's overfitting claim.
- ``smooth``: Quadapter scales on every Linear input (SmoothQuant init, alpha=0.8), trained
  block-wise, MSE-clipped weight rows rounded by GPTQ; policy ``linear-inputs``, so every Linear
  is one int8 GEMM. ``smooth-fold``: only the scales that fold into a norm or an upstream
  Linear's rows (no run-time multiply: every GEMM keeps its fusions); with ``+sink`` the
  ``fast`` preset. ``smooth-peg``: Quadapter at the norm edges and K=48 PEG groups on the other
  Linear inputs; with ``+sink`` the ``accurate`` preset.
- ``best``: PEG with K=24 range-sized groups on every channel-axis activation, MSE-clipped
  weight rows rounded by GPTQ, policy ``full`` (the best ``full``-policy recipe measured; every
  Linear lowers to 24 int8 sub-GEMMs).
- ``rotate``: gamma migration, then the residual stream rotated by a seeded randomized Hadamard
  matrix folded into the embedding and the Linears around the stream (QuaRot's exact rotation);
  policy ``linear-inputs``. Models without a rotatable stream (LayerNorm) run it as ``os`` without
  clipping: the rotation pass does not apply and says why.
- Suffixes, applied left to right: ``+lsq`` (the fine stage, :class:`~outlierfx.passes.LearnRanges`),
  ``+gptq`` (:class:`~outlierfx.passes.GPTQ` weight rounding), ``+sink`` (the first token of each
  sequence on an activation grid of its own). A suffix that repeats a pass is refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ..graph.roles import Role
from ..passes.clip_tokenwise import ClipTokenwise
from ..passes.gptq import GPTQ
from ..passes.group_channels import CHANNEL_ROLES, GroupChannels
from ..passes.learn_ranges import LearnRanges
from ..passes.migrate_gamma import MigrateGamma
from ..passes.qat import QAT
from ..passes.fold_quadapter import FoldQuadapter
from ..passes.quadapter import InsertQuadapter
from ..passes.rotate_ffn import RotateFFN
from ..passes.rotate_heads import RotateHeads
from ..passes.rotate_residual import RotateResidual
from ..passes.train_quadapter import TrainQuadapter
from ..quantizers.spec import Estimator
from .base import Need, Recipe, RecipeError, Step, UnknownRecipeError, step

FINE_SUFFIX = "+lsq"
GPTQ_SUFFIX = "+gptq"
SINK_SUFFIX = "+sink"

_DATA = {"batches": Need.BATCHES, "progress": Need.PROGRESS}
MIGRATE = step(MigrateGamma)
# every channel's gamma must leave the norm for the residual rotation to be exact; RMSNorm has no
# beta, so migrating a tiny gamma only scales Linear columns (LayerNorm offsets stay guarded by
# max_offset)
ROTATIONS = (step(MigrateGamma, min_gamma_ratio=0.0), step(RotateResidual), step(RotateHeads), step(RotateFFN))
CLIP = step(ClipTokenwise, _DATA)
PEG6 = step(GroupChannels, groups=6)


def quadapter_steps(explicit: bool = False, foldable_only: bool = False, **train: Any) -> tuple[Step, ...]:
    """Insert, train (``train`` goes to :class:`~outlierfx.passes.TrainQuadapter`: init, alpha, lr...)
    and fold Quadapter scales."""
    return (step(InsertQuadapter, explicit=explicit, foldable_only=foldable_only),
            step(TrainQuadapter, {**_DATA, "weight": Need.WEIGHT_SPEC}, **train), step(FoldQuadapter))


def gptq_step(**settings: Any) -> Step:
    return step(GPTQ, {"batches": Need.BATCHES, "weight_spec": Need.QUANTIZED_WEIGHTS,
                       "embedding_spec": Need.EMBEDDING_SPEC}, **settings)


def learn_ranges_step(**settings: Any) -> Step:
    return step(LearnRanges, {**_DATA, "weight_spec": Need.WEIGHT_SPEC, "embedding_spec": Need.EMBEDDING_SPEC},
                **settings)


def quadapter_recipe(name: str = "quadapter", os: bool = False, explicit: bool = False, foldable_only: bool = False,
                     **train: Any) -> Recipe:
    """A Quadapter recipe (``os``: after gamma migration and token-wise clipping); ``explicit`` also
    scales the Linear inputs no norm produces, ``foldable_only`` only those whose scale folds."""
    what = "gamma migration + token-wise clipping + Quadapter" if os else "Quadapter"
    return Recipe(name, f"{what}: per-channel scales at norm -> Linear edges, trained block-wise, folded",
                  prepare=(MIGRATE,) if os else (),
                  finish=(*((CLIP,) if os else ()), *quadapter_steps(explicit, foldable_only, **train)))


def with_fine_stage(base: Recipe, name: str | None = None, **learn: Any) -> Recipe:
    """``base`` followed by :class:`~outlierfx.passes.LearnRanges` (``learn``: steps, lr, ...)."""
    return base.then(learn_ranges_step(**learn), name=name or base.name + FINE_SUFFIX,
                     description=f"{base.description}, then ranges learned against the output (LSQ+)")


def with_gptq(base: Recipe, name: str | None = None, **gptq: Any) -> Recipe:
    """``base`` with its Linear weights rounded by :class:`~outlierfx.passes.GPTQ` last (``gptq``: damp)."""
    return base.then(gptq_step(**gptq), name=name or base.name + GPTQ_SUFFIX,
                     description=f"{base.description}, then weights rounded by GPTQ")


def with_sink_token(base: Recipe, name: str | None = None, tokens: int = 1) -> Recipe:
    """``base`` with the first ``tokens`` positions of each sequence on an activation grid of their own."""
    if base.sink_tokens:
        raise RecipeError(f"recipe {base.name!r} already gives the first {base.sink_tokens} token(s) a grid "
                          f"of their own; '+sink' applies once")
    return dataclasses.replace(base, name=name or base.name + SINK_SUFFIX, sink_tokens=tokens,
                               description=f"{base.description}; the first {tokens} token(s) of each sequence "
                                           f"on an activation grid of their own")


# Tuned on MiniLM (the one per-model-tuned constant of the default preset's smooth-fold route,
# with SPEED_SINK_MIN_WIDENING): the SmoothQuant init s = max|W|^(1-a) / max|x|^a at W8A8,
# untrained, gave cosine 0.9872 / 0.9975 / 0.9962 at alpha 0.5 / 0.8 / 1.0 with scales at every
# Linear input (bench/scripts/smooth_alpha.py, bench/results/minilm/smooth-alpha.json). Checked
# on generated BERT, GPT-2 and ModernBERT with injected outlier channels in
# tests/test_tuned_constants.py; docs/choosing.md lists the tuned constants.
SMOOTHQUANT_ALPHA = 0.8


def _smooth_family(name: str, description: str, observe: tuple[Step, ...] = (), **sites: bool) -> Recipe:
    """Quadapter scales (``sites`` go to InsertQuadapter) with the SmoothQuant init at
    ``SMOOTHQUANT_ALPHA``, trained block-wise and folded; MSE-clipped weight rows rounded by
    GPTQ; policy ``linear-inputs``."""
    return Recipe(name, description, observe=observe,
                  finish=(*quadapter_steps(init="smoothquant", alpha=SMOOTHQUANT_ALPHA, **sites), gptq_step()),
                  default_policy="linear-inputs", weight_estimator=Estimator.MSE)


# Range-sized PEG groups on the Linear inputs no norm produces (attention contexts, GELU/SwiGLU
# outputs), which norm-site Quadapter scales do not reach. K=48, tuned on SmolLM2 (the
# ``accurate`` preset's, not the default's): on SmolLM2 (+sink, W8A8) 24 groups gave wiki
# perplexity 20.77, 48 gave 20.70 (FP32 20.31).
PEG_UNSCALED_LINEAR_INPUTS = step(GroupChannels, groups=48, roles=frozenset({Role.LINEAR_INPUT}), grouping="range",
                                  exclude_roles=frozenset({Role.NORM_OUTPUT}))
# The speed route keeps a first-token grid (+sink) only where it pays for its second GEMM. Tuned
# on MiniLM (checked on generated LayerNorm models with a massive first token in
# tests/test_tuned_constants.py; docs/choosing.md): the [CLS] token widens the GELU outputs
# 2.2-4x and every other tensor at most 1.26x; only the four GELU-output grids of sixteen gave
# cosine 0.99918 against 0.99921 with all (0.99714 with none). The accuracy recipes keep a grid wherever the first tokens do not fit: on SmolLM2
# smooth-peg+sink (W8A8) the 1.5x rule gave wiki perplexity 20.80, a grid everywhere 20.85, the
# default 20.70 (FP32 20.31). (docs/experiments/first-token-grids.md)
SPEED_SINK_MIN_WIDENING = 1.5


def _registry() -> dict[str, Recipe]:
    recipes = [
        Recipe("naive", "per-tensor min-max PTQ"),
        Recipe("mp16", "naive with FFN input/output and residual sums at 16 bit", default_policy="mp16"),
        Recipe("os", "gamma migration + token-wise clipping (Outlier Suppression)", prepare=(MIGRATE,), finish=(CLIP,)),
        Recipe("peg", "per-embedding-group quantization, K=6 sorted, on FFN in/out and residual sums", observe=(PEG6,)),
        Recipe("os+peg", "gamma migration + PEG + token-wise clipping", prepare=(MIGRATE,), observe=(PEG6,),
               finish=(CLIP,)),
        Recipe("clip", "token-wise clipping alone (ablation)", finish=(CLIP,)),
        Recipe("peg+clip", "PEG + token-wise clipping, no gamma migration", observe=(PEG6,), finish=(CLIP,)),
        quadapter_recipe("quadapter"),
        quadapter_recipe("os+quadapter", os=True),
        Recipe("qat", "naive PTQ ranges, then quantization-aware training of every Linear weight on the batches "
                      "(language-modelling loss; distillation for encoders)",
               finish=(step(QAT, {**_DATA, "weight_spec": Need.QUANTIZED_WEIGHTS,
                                  "embedding_spec": Need.EMBEDDING_SPEC}),)),
        _smooth_family("smooth", "per-channel scales on every Linear input (SmoothQuant init, alpha=0.8; folded into "
                                 "norms and Linear columns, an explicit multiply elsewhere), trained block-wise, "
                                 "MSE-clipped weight rows; per-tensor activations, so each Linear stays one int8 GEMM",
                       explicit=True),
        dataclasses.replace(_smooth_family(
            "smooth-fold", "smooth without run-time multiplies: scales only where they fold (norms, V's and up's "
                           "rows), so each int8 GEMM keeps its GELU/requantize fusions; first-token grids (+sink) "
                           f"only where they widen a range >= {SPEED_SINK_MIN_WIDENING:g}x",
            explicit=True, foldable_only=True), sink_min_widening=SPEED_SINK_MIN_WIDENING),
        _smooth_family("smooth-peg", "Quadapter scales at the norm -> Linear edges (SmoothQuant init, alpha=0.8, "
                                     "trained block-wise, folded) and K=48 range-sized PEG groups on the other Linear "
                                     "inputs (attention contexts, GELU/SwiGLU outputs), MSE-clipped weight rows "
                                     "rounded by GPTQ", observe=(PEG_UNSCALED_LINEAR_INPUTS,)),
        Recipe("best", "the best full-policy recipe measured: PEG on every channel-axis activation (residual stream, "
                       "norm outputs, Linear inputs and outputs), K=24 sorted groups sized by range; each weight row "
                       "clipped to its MSE-optimal range, rounded by GPTQ",
               observe=(step(GroupChannels, groups=24, roles=CHANNEL_ROLES, grouping="range"),),
               finish=(gptq_step(),), weight_estimator=Estimator.MSE),
        Recipe("rotate", "QuaRot's exact rotations: gamma migration, then the residual stream rotated by a seeded "
                         "randomized Hadamard matrix folded into the embedding and every Linear reading or writing "
                         "it (RMSNorm decoders only), each attention head's values rotated (folded into the value "
                         "and output Linears), and an online Hadamard transform before each FFN output Linear; "
                         "per-tensor activations on every Linear input",
               prepare=ROTATIONS, default_policy="linear-inputs"),
    ]
    return {r.name: r for r in recipes}


RECIPES: dict[str, Recipe] = _registry()
_SUFFIXES: dict[str, Callable[[Recipe], Recipe]] = {FINE_SUFFIX: with_fine_stage, GPTQ_SUFFIX: with_gptq,
                                                    SINK_SUFFIX: with_sink_token}


def paper_recipe(name: str) -> Recipe:
    """A named recipe, optionally followed by suffixes applied left to right (``os+lsq``,
    ``smooth-fold+sink``); raises :class:`RecipeError` for an unknown name or a suffix that
    repeats a pass."""
    if name in RECIPES:
        return RECIPES[name]
    for suffix, add in _SUFFIXES.items():
        if name.endswith(suffix) and len(name) > len(suffix):
            try:
                base = paper_recipe(name[: -len(suffix)])
            except UnknownRecipeError:
                break
            return dataclasses.replace(add(base), name=name)
    raise UnknownRecipeError(f"unknown recipe {name!r}; presets: fast, accurate; recipes: {', '.join(RECIPES)} "
                      f"(each also followed by {' and/or '.join(_SUFFIXES)})")
