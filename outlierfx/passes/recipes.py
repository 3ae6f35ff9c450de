"""Named recipes: which passes run before observers go in, on the observers before calibration,
and after calibration; and the default placement policy.

- ``naive``: plain PTQ, per-tensor min-max activations, per-channel symmetric weights.
- ``mp16``: ``naive`` with the FFN input/output and residual sums at 16 bit (W8A{8,16}).
- ``os``: Outlier Suppression: gamma migration, then token-wise clipping.
- ``peg``: per-embedding-group quantization (K=6, sorted channels) of the FFN input/output and
  residual sums.
- ``os+peg``: both.
- ``clip``, ``peg+clip``: ablations (clipping without gamma migration).
- ``best``: what the measurements in the README recommend (today: PEG with K=24 range-sized
  groups on every channel-axis activation, MSE-clipped weight rows, weights rounded by GPTQ;
  the fine stage lowered the calibration loss but not the held-out quality). Slow once lowered:
  every Linear becomes 24 int8 sub-GEMMs.
- ``quadapter``: learned per-channel scales at the norm -> Linear edges (Park et al. 2022),
  trained block by block on the calibration batches, then folded; ``os+quadapter`` after gamma
  migration and token-wise clipping. Training uses the policy's weight spec (``quadapter_recipe``
  makes variants with other inits and settings).
- ``smooth``: the speed route's quality recipe (policy ``linear-inputs``): Quadapter scales on
  every Linear input (``explicit`` sites too), SmoothQuant init with alpha=0.8, trained
  block-wise, MSE-clipped weight rows rounded by GPTQ; activations stay per tensor, so every
  Linear lowers to one int8 GEMM.
- ``smooth-fold``: ``smooth`` with scales only where they fold into a norm or an upstream
  Linear's rows (``InsertQuadapter(foldable_only=True)``): no multiply is left at run time, so
  every int8 GEMM keeps its fusions (GELU and requantization on onednn and inductor). On BERT
  this drops the GELU-output scales; on Llama nothing (SwiGLU's fold into ``up``).
  ``smooth-fold+sink`` is the eager speed route (README "Speed").
- ``smooth-peg``: Quadapter at the paper's sites (norm -> Linear edges; SmoothQuant init,
  alpha=0.8, trained block-wise, folded) with PEG (K=48 range-sized groups) on the Linear inputs
  no norm produces (attention contexts, GELU/SwiGLU outputs: where SmolLM2's ``smooth`` error
  sits), MSE-clipped weight rows rounded by GPTQ; policy ``linear-inputs``. Accuracy route: the
  grouped Linears lower to 48 int8 sub-GEMMs each (or stay simulated with ``+sink``).
- ``qat``: ``naive`` ranges, then quantization-aware training of the Linear weights on the
  calibration batches (:class:`QAT`): the baseline of Quadapter's overfitting claim.
- ``<recipe>+lsq``: any recipe followed by the fine stage, :class:`LearnRanges` (every
  activation range learned against the model output, LSQ+ style), e.g. ``os+lsq``, ``peg+lsq``.
- ``<recipe>+gptq``: any recipe with its Linear weights rounded by :class:`GPTQ` last (to the
  grid point that minimises each layer's output error, not the nearest one), e.g.
  ``smooth+gptq``; suffixes chain (``peg+lsq+gptq``).
- ``<recipe>+sink``: any recipe whose activation quantizers give the first token of each
  sequence a per-tensor grid of its own (``QuantSpec.sink_tokens``), so the attention-sink
  token's massive activations stop setting every other token's range (per tensor: where it does
  not fit the other tokens' range; ``smooth-fold``, the speed route: where it would widen that
  range 1.5x or more). Lowering: Linears that read them run in int8 on the
  eager engines (float output) and in the reference/inductor form (the first rows as a second,
  small GEMM); PEG groups with a first-token grid stay simulated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import torch

from ..graph.roles import Role
from ..quantizers.policy import BitWidths, QuantPolicy, make_policy
from ..quantizers.spec import Estimator
from .base import GraphPass
from .clip_tokenwise import ClipTokenwise
from .gptq import GPTQ
from .group_channels import CHANNEL_ROLES, GroupChannels
from .learn_ranges import LearnRanges
from .migrate_gamma import MigrateGamma
from .qat import QAT
from .fold_quadapter import FoldQuadapter
from .quadapter import InsertQuadapter
from .train_quadapter import TrainQuadapter

Batches = Sequence[Mapping[str, torch.Tensor]]
FINE_SUFFIX = "+lsq"
GPTQ_SUFFIX = "+gptq"
SINK_SUFFIX = "+sink"


def _none(*_: object) -> list[GraphPass]:
    return []


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    prepare: Callable[[], list[GraphPass]] = _none  # before observers
    observe: Callable[[], list[GraphPass]] = _none  # on observers, before calibration
    # after calibration, before conversion: (batches, the policy applied, show progress bars)
    finish: Callable[[Batches, QuantPolicy, bool], list[GraphPass]] = _none
    default_policy: str = "full"
    weight_estimator: Estimator = Estimator.MINMAX  # how named policies' Linear weight ranges are set
    sink_tokens: int = 0  # named policies: first positions of each sequence on a grid of their own
    # ... kept only where they widen a per-tensor range this much or more (1: wherever they do not fit)
    sink_min_widening: float = 1.0

    def policy(self, bits: BitWidths, policy: str | QuantPolicy | None) -> QuantPolicy:
        if isinstance(policy, QuantPolicy):
            return policy
        chosen = make_policy(policy or self.default_policy, bits)
        if self.sink_tokens:
            chosen = chosen.with_sink_tokens(self.sink_tokens, self.sink_min_widening)
        if chosen.weight is None or self.weight_estimator is chosen.weight.estimator:
            return chosen
        return dataclasses.replace(chosen, weight=chosen.weight.with_(estimator=self.weight_estimator))


def _migrate() -> list[GraphPass]:
    return [MigrateGamma()]


def _peg() -> list[GraphPass]:
    return [GroupChannels(groups=6)]


def _clip(batches: Batches, _policy: QuantPolicy, progress: bool = False) -> list[GraphPass]:
    return [ClipTokenwise(batches, progress=progress)]


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("naive", "per-tensor min-max PTQ"),
        Recipe("mp16", "naive with FFN input/output and residual sums at 16 bit", default_policy="mp16"),
        Recipe("os", "gamma migration + token-wise clipping (Outlier Suppression)", _migrate, _none, _clip),
        Recipe("peg", "per-embedding-group quantization, K=6 sorted, on FFN in/out and residual sums",
               observe=_peg),
        Recipe("os+peg", "gamma migration + PEG + token-wise clipping", _migrate, _peg, _clip),
        Recipe("clip", "token-wise clipping alone (ablation)", finish=_clip),
        Recipe("peg+clip", "PEG + token-wise clipping, no gamma migration", observe=_peg, finish=_clip),
    )
}


def quadapter_recipe(name: str = "quadapter", os: bool = False, explicit: bool = False, foldable_only: bool = False,
                     **train: object) -> Recipe:
    """A Quadapter recipe; ``train`` goes to :class:`TrainQuadapter` (``weight``, ``init``, ``lr``...);
    ``explicit`` also scales the Linear inputs no norm produces, ``foldable_only`` only those whose
    scale folds into an upstream Linear (see :class:`InsertQuadapter`)."""

    def finish(batches: Batches, policy: QuantPolicy, progress: bool = True) -> list[GraphPass]:
        settings = {"weight": policy.weight, "progress": progress, **train}
        return [*(_clip(batches, policy, progress) if os else []), InsertQuadapter(explicit=explicit, foldable_only=foldable_only),
                TrainQuadapter(batches, **settings), FoldQuadapter()]  # type: ignore[arg-type]

    what = "gamma migration + token-wise clipping + Quadapter" if os else "Quadapter"
    return Recipe(name, f"{what}: per-channel scales at norm -> Linear edges, trained block-wise, folded",
                  _migrate if os else _none, _none, finish)


RECIPES["quadapter"] = quadapter_recipe("quadapter")
RECIPES["os+quadapter"] = quadapter_recipe("os+quadapter", os=True)


def _qat(batches: Batches, policy: QuantPolicy, progress: bool = False) -> list[GraphPass]:
    if policy.weight is None:
        raise ValueError("QAT trains quantized weights; the policy keeps them float")
    return [QAT(batches, policy.weight, policy.embedding, progress=progress)]


RECIPES["qat"] = Recipe("qat", "naive PTQ ranges, then quantization-aware training of every Linear weight on the "
                               "batches (language-modelling loss; distillation for encoders)", finish=_qat)


def with_fine_stage(base: Recipe, name: str | None = None, **learn: object) -> Recipe:
    """``base`` followed by :class:`LearnRanges` (``learn`` goes to it: steps, lr, ...)."""

    def finish(batches: Batches, policy: QuantPolicy, progress: bool = True) -> list[GraphPass]:
        settings = {"progress": progress, **learn}
        return [*base.finish(batches, policy, progress),
                LearnRanges(batches, policy.weight, policy.embedding, **settings)]  # type: ignore[arg-type]

    return dataclasses.replace(base, name=name or base.name + FINE_SUFFIX, finish=finish,
                               description=f"{base.description}, then ranges learned against the output (LSQ+)")


def with_gptq(base: Recipe, name: str | None = None, **gptq: object) -> Recipe:
    """``base`` with its Linear weights rounded by :class:`GPTQ` last (``gptq`` goes to it: damp)."""

    def finish(batches: Batches, policy: QuantPolicy, progress: bool = True) -> list[GraphPass]:
        if policy.weight is None:
            raise ValueError("GPTQ rounds quantized weights; the policy keeps them float")
        return [*base.finish(batches, policy, progress),
                GPTQ(batches, policy.weight, policy.embedding, **gptq)]  # type: ignore[arg-type]

    return dataclasses.replace(base, name=name or base.name + GPTQ_SUFFIX, finish=finish,
                               description=f"{base.description}, then weights rounded by GPTQ")


def _smooth_family(name: str, description: str, observe: Callable[[], list[GraphPass]] = _none,
                   **sites: bool) -> Recipe:
    """The ``smooth`` recipes: Quadapter scales (``sites`` go to :class:`InsertQuadapter`) with the
    SmoothQuant init at alpha=0.8, trained block-wise and folded; MSE-clipped weight rows rounded
    by GPTQ; policy ``linear-inputs``."""
    return with_gptq(dataclasses.replace(
        quadapter_recipe(name, init="smoothquant", alpha=0.8, **sites), observe=observe, description=description,
        default_policy="linear-inputs", weight_estimator=Estimator.MSE), name=name)


def _peg_unscaled_linear_inputs() -> list[GraphPass]:
    """Range-sized PEG groups on the Linear inputs that no norm produces (attention contexts,
    GELU/SwiGLU outputs), which norm-site Quadapter scales do not reach. K=48: on SmolLM2
    (``+sink``, W8A8) 24 groups gave wiki perplexity 20.77, 48 gave 20.70 (FP32 20.31)."""
    return [GroupChannels(groups=48, roles=frozenset({Role.LINEAR_INPUT}), grouping="range",
                          exclude_roles=frozenset({Role.NORM_OUTPUT}))]


RECIPES["smooth"] = _smooth_family(
    "smooth", "for int8 GEMM speed: per-channel scales on every Linear input (SmoothQuant init, alpha=0.8; "
              "folded into norms and Linear columns, an explicit multiply elsewhere), trained block-wise, "
              "MSE-clipped weight rows; per-tensor activations, so each Linear stays one int8 GEMM",
    explicit=True)
# The speed route keeps a first-token grid (+sink) only where it pays for its second GEMM. On
# MiniLM the [CLS] token widens the GELU outputs 2.2-4x and every other tensor at most 1.26x;
# only the four GELU-output grids of sixteen gave cosine 0.99918 against 0.99921 with all (0.99714
# with none). The accuracy recipes keep a grid wherever the first tokens do not fit: on SmolLM2
# smooth-peg+sink (W8A8) the 1.5x rule gave wiki perplexity 20.80, a grid everywhere (also where
# they fit) 20.85, the default 20.70 (FP32 20.31).
SPEED_SINK_MIN_WIDENING = 1.5
RECIPES["smooth-fold"] = dataclasses.replace(_smooth_family(
    "smooth-fold", "smooth without run-time multiplies: scales only where they fold (norms, V's and up's rows), so "
                   "each int8 GEMM keeps its GELU/requantize fusions; with +sink the speed route on onednn "
                   f"(first-token grids only where they widen a range >= {SPEED_SINK_MIN_WIDENING:g}x)",
    explicit=True, foldable_only=True), sink_min_widening=SPEED_SINK_MIN_WIDENING)
RECIPES["smooth-peg"] = _smooth_family(
    "smooth-peg", "Quadapter scales at the norm -> Linear edges (SmoothQuant init, alpha=0.8, trained block-wise, "
                  "folded) and K=48 range-sized PEG groups on the other Linear inputs (attention contexts, "
                  "GELU/SwiGLU outputs), MSE-clipped weight rows rounded by GPTQ",
    observe=_peg_unscaled_linear_inputs)
# "best" is measured, not assumed: README "Accuracy" has the ablations behind each part
RECIPES["best"] = with_gptq(Recipe(
    "best", "recommended: PEG on every channel-axis activation (residual stream, norm outputs, Linear inputs and "
            "outputs), K=24 sorted groups sized by range (outlier channels get groups of their own); "
            "each weight row clipped to its MSE-optimal range",
    observe=lambda: [GroupChannels(groups=24, roles=CHANNEL_ROLES, grouping="range")],
    weight_estimator=Estimator.MSE), name="best")


def with_sink_token(base: Recipe, name: str | None = None, tokens: int = 1) -> Recipe:
    """``base`` with the first ``tokens`` positions of each sequence on an activation grid of their own."""
    return dataclasses.replace(base, name=name or base.name + SINK_SUFFIX, sink_tokens=tokens,
                               description=f"{base.description}; the first {tokens} token(s) of each sequence "
                                           f"on an activation grid of their own")


_SUFFIXES: dict[str, Callable[[Recipe], Recipe]] = {FINE_SUFFIX: with_fine_stage, GPTQ_SUFFIX: with_gptq,
                                                    SINK_SUFFIX: with_sink_token}


def get_recipe(name: str) -> Recipe:
    """A registered recipe, optionally followed by suffixes applied left to right:
    ``+lsq`` (the fine stage, :class:`LearnRanges`), ``+gptq`` (:class:`GPTQ` weight rounding) and
    ``+sink`` (the first token on its own activation grid), e.g. ``os+lsq``, ``smooth+sink``."""
    if name in RECIPES:
        return RECIPES[name]
    for suffix, add in _SUFFIXES.items():
        if name.endswith(suffix) and len(name) > len(suffix):
            try:
                base = get_recipe(name[: -len(suffix)])
            except ValueError:
                break
            return dataclasses.replace(add(base), name=name)
    raise ValueError(f"unknown recipe {name!r}; available: {', '.join(RECIPES)} "
                     f"(each also followed by {' and/or '.join(_SUFFIXES)})")
