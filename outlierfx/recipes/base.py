"""Recipes as data: a named pipeline of configured passes in stages.

A :class:`Recipe` lists :class:`Step` values (a pass type and its settings) in three stages of
its own; the runner (:mod:`outlierfx.recipes.runner`) adds the fixed ones:

- ``prepare``: rewrites of the float graph (gamma migration), before observers go in;
- (``InsertObservers`` with the recipe's policy);
- ``observe``: passes on the observers, before calibration (PEG grouping);
- (``Calibrate``: the batches through the observers, an audited pass);
- ``finish``: after calibration (clipping, Quadapter, GPTQ, the fine stage...);
- (``ConvertToFakeQuant``), then lowering to the backend.

Passes that need run-time data (the calibration batches, the policy's weight spec, whether to
show progress) say so in ``Step.supply``; the runner hands it to them, so a recipe holds no
data and can be built, compared, printed and validated before any model is seen. Composition is
checked when a recipe is made: a pass in the wrong stage, a pass twice, or a pass before the one
it builds on is refused with :class:`RecipeError`.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import OutlierFXError
from ..passes.base import GraphPass
from ..quantizers.policy import BitWidths, QuantPolicy, make_policy
from ..quantizers.spec import Estimator


class RecipeError(OutlierFXError, ValueError):
    """A recipe that cannot be built or run as composed."""


class UnknownRecipeError(RecipeError):
    """A recipe or preset name that is not registered."""


class Stage(enum.Enum):
    PREPARE = "prepare"
    OBSERVE = "observe"
    FINISH = "finish"


class Need(enum.Enum):
    """What the runner supplies to a pass's constructor."""

    BATCHES = "the calibration batches"
    WEIGHT_SPEC = "the policy's Linear weight spec"  # may be None: weights kept float
    QUANTIZED_WEIGHTS = "the policy's Linear weight spec (required)"
    EMBEDDING_SPEC = "the policy's embedding spec"
    PROGRESS = "whether to show progress bars"


@dataclasses.dataclass(frozen=True)
class RunContext:
    """The data a recipe run hands to its passes."""

    batches: Sequence[Mapping[str, torch.Tensor]]
    policy: QuantPolicy
    progress: bool = False

    def value(self, need: Need, who: str) -> Any:
        if need is Need.BATCHES:
            return self.batches
        if need is Need.WEIGHT_SPEC:
            return self.policy.weight
        if need is Need.QUANTIZED_WEIGHTS:
            if self.policy.weight is None:
                raise RecipeError(f"{who} works on quantized Linear weights, but policy {self.policy.name!r} keeps "
                                  f"them float; use a policy that quantizes weights (full, linear-inputs)")
            return self.policy.weight
        if need is Need.EMBEDDING_SPEC:
            return self.policy.embedding
        return self.progress


@dataclasses.dataclass(frozen=True)
class Step:
    """One configured pass: ``pass_type(**settings, **supplied)``; ``supply`` maps constructor
    keywords to what the runner provides."""

    pass_type: type[GraphPass]
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    supply: Mapping[str, Need] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        both = sorted(set(self.settings) & set(self.supply))
        if both:
            raise RecipeError(f"{self.pass_type.__name__}: {', '.join(both)} is supplied by the runner at run time; "
                              f"do not set it in the recipe")

    @property
    def name(self) -> str:
        return self.pass_type.__name__

    def build(self, context: RunContext) -> GraphPass:
        supplied = {key: context.value(need, self.name) for key, need in self.supply.items()}
        return self.pass_type(**self.settings, **supplied)

    def describe(self) -> str:
        args = ", ".join(f"{k}={_short(v)}" for k, v in self.settings.items())
        return f"{self.name}({args})"


def _short(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, (frozenset, set)):
        return "{" + ", ".join(sorted(_short(v) for v in value)) + "}"
    return repr(value)


# Where the known passes belong, and which pass each builds on (it must come earlier in the
# recipe). A user's own pass types are free to go anywhere.
STAGE_OF: dict[str, Stage] = {
    **dict.fromkeys(("MigrateGamma", "DetectNorms", "RotateResidual", "RotateHeads", "RotateFFN"), Stage.PREPARE),
    "GroupChannels": Stage.OBSERVE,
    **dict.fromkeys(("ClipTokenwise", "InsertQuadapter", "TrainQuadapter", "FoldQuadapter", "QAT", "LearnRanges",
                     "GPTQ"), Stage.FINISH),
}
BUILDS_ON: dict[str, str] = {"TrainQuadapter": "InsertQuadapter", "FoldQuadapter": "InsertQuadapter",
                             "RotateResidual": "MigrateGamma"}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A named pipeline of configured passes in stages, and the defaults of its policy.

    ``default_policy`` names where quantizers go (``full``, ``linear-inputs``, ``mp16``);
    ``weight_estimator`` how Linear weight ranges are set; ``asymmetric_weights`` puts Linear
    weight rows below 8 bits on an asymmetric grid (all 2^b levels with a zero point per row,
    not the symmetric grid's 2^b - 1; int8 kernels run the codes minus the zero point,
    ``kernel_weight_spec``); 8-bit rows, the W4 LM head's included, stay symmetric (an
    asymmetric 8-bit row's codes would not fit int8); ``sink_tokens`` gives the first
    positions of each sequence a grid of their own, kept only where they widen a per-tensor
    range ``sink_min_widening`` times or more (1: wherever they do not fit).
    """

    name: str
    description: str
    prepare: tuple[Step, ...] = ()
    observe: tuple[Step, ...] = ()
    finish: tuple[Step, ...] = ()
    default_policy: str = "full"
    weight_estimator: Estimator = Estimator.MINMAX
    asymmetric_weights: bool = False
    sink_tokens: int = 0
    sink_min_widening: float = 1.0

    def __post_init__(self) -> None:
        for field in ("prepare", "observe", "finish"):
            object.__setattr__(self, field, tuple(getattr(self, field)))
        self.validate()

    @property
    def steps(self) -> tuple[tuple[Stage, Step], ...]:
        return (*((Stage.PREPARE, s) for s in self.prepare), *((Stage.OBSERVE, s) for s in self.observe),
                *((Stage.FINISH, s) for s in self.finish))

    def validate(self) -> None:
        """Refuse a pass in the wrong stage, a pass twice, or a pass before the one it builds on."""
        seen: list[str] = []
        for stage, step in self.steps:
            pass_type = getattr(step, "pass_type", None)
            if not (isinstance(step, Step) and isinstance(pass_type, type) and issubclass(pass_type, GraphPass)):
                raise RecipeError(f"recipe {self.name!r}: {step!r} is not a Step of a GraphPass type")
            name = step.name
            if name in seen:
                raise RecipeError(f"recipe {self.name!r} runs {name} twice; a pass appears once per recipe "
                                  f"(e.g. 'smooth' already ends with GPTQ, so 'smooth+gptq' is refused)")
            wanted = STAGE_OF.get(name)
            if wanted is not None and wanted is not stage:
                raise RecipeError(f"recipe {self.name!r}: {name} belongs to the {wanted.value} stage, "
                                  f"not {stage.value}")
            needed = BUILDS_ON.get(name)
            if needed is not None and needed not in seen:
                raise RecipeError(f"recipe {self.name!r}: {name} builds on {needed}, which must come before it")
            seen.append(name)
        if self.sink_tokens < 0 or self.sink_min_widening < 1.0:
            raise RecipeError(f"recipe {self.name!r}: sink_tokens must be >= 0 and sink_min_widening >= 1")

    def has(self, pass_name: str) -> bool:
        return any(step.name == pass_name for _, step in self.steps)

    def then(self, *steps: Step, name: str, description: str) -> Recipe:
        """This recipe with ``steps`` appended to its finish stage (validated)."""
        return dataclasses.replace(self, name=name, description=description, finish=(*self.finish, *steps))

    def build(self, stage: Stage, context: RunContext) -> list[GraphPass]:
        return [step.build(context) for s, step in self.steps if s is stage]

    def policy(self, bits: BitWidths, policy: str | QuantPolicy | None = None) -> QuantPolicy:
        """The placement policy a run uses: ``policy`` as given, or this recipe's default for ``bits``."""
        if isinstance(policy, QuantPolicy):
            return policy
        chosen = make_policy(policy or self.default_policy, bits)
        if self.sink_tokens:
            chosen = chosen.with_sink_tokens(self.sink_tokens, self.sink_min_widening)
        if chosen.weight is None:
            return chosen
        weight = chosen.weight.with_(estimator=self.weight_estimator)
        if self.asymmetric_weights and weight.bits < 8:
            weight = weight.with_(symmetric=False, signed=False)
        return chosen if weight == chosen.weight else dataclasses.replace(chosen, weight=weight)

    def describe(self) -> str:
        """The pipeline, one stage a line (the fixed stages in brackets)."""
        def line(steps: tuple[Step, ...]) -> str:
            return ", ".join(s.describe() for s in steps) or "-"

        extras = [f"policy {self.default_policy}", f"weight ranges {self.weight_estimator.value}"
                  + (" on asymmetric rows" if self.asymmetric_weights else "")]
        if self.sink_tokens:
            extras.append(f"first {self.sink_tokens} token(s) on their own grid where they widen a range "
                          f">= {self.sink_min_widening:g}x")
        return "\n".join([f"{self.name}: {self.description}", f"  prepare: {line(self.prepare)}",
                          "  [InsertObservers]", f"  observe: {line(self.observe)}", "  [Calibrate]",
                          f"  finish: {line(self.finish)}", "  [ConvertToFakeQuant]", "  " + "; ".join(extras)])


def step(pass_type: type[GraphPass], supply: Mapping[str, Need] | None = None, **settings: Any) -> Step:
    """A :class:`Step` of ``pass_type`` with ``settings``; ``supply``: constructor keyword -> :class:`Need`."""
    return Step(pass_type, dict(settings), dict(supply or {}))
