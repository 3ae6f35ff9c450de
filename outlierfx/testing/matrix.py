"""The architecture matrix: each tiny architecture (:mod:`.architectures`) through the stages a
user's model goes through, one recorded outcome per stage.

Stages (issue 25; those not run yet are listed in ``STAGES_NOT_RUN``):
1. ``capture``: the graph equals the model on the example shape and on another batch and length;
2. ``naive``: ``quantize(recipe="naive", policy="linear-inputs")`` gives a simulated model;
3. ``lower-onednn``: the onednn int8 model agrees with the simulated one token by token;
5. ``other-shapes``: the int8 model runs another batch size and sequence length.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from .architectures import build_architecture
from .equivalence import assert_equivalent, assert_tokens_close

CAPTURE_TOL = 1e-5  # of the output's max magnitude, as for the generated BERT/GPT-2/Llama models
LOWERED_MIN_COSINE = 0.999
"""Per real token, int8 kernels against the simulated model: rounding ties move single values
by one quantization step, so a relative tolerance is the wrong measure (see assert_tokens_close)."""
OTHER_SHAPE = {"batch": 3, "seq": 11, "seed": 1}
STAGES = ("capture", "naive", "lower-onednn", "other-shapes")
STAGES_NOT_RUN = ("default preset", "lower-inductor", "save-load")


@dataclasses.dataclass(frozen=True)
class StageOutcome:
    stage: str
    passed: bool
    detail: str = ""  # the error where it failed


@dataclasses.dataclass(frozen=True)
class MatrixRow:
    architecture: str
    outcomes: tuple[StageOutcome, ...]

    @property
    def passed(self) -> bool:
        return len(self.outcomes) == len(STAGES) and all(o.passed for o in self.outcomes)

    def summary(self) -> str:
        cells = [f"{o.stage}: {'ok' if o.passed else 'FAILED ' + o.detail}" for o in self.outcomes]
        skipped = [s for s in STAGES[len(self.outcomes):]]
        return f"{self.architecture}: " + "; ".join(cells + [f"{s}: not reached" for s in skipped])


def run_architecture(model_type: str) -> MatrixRow:
    """Run ``model_type`` through the stages in order; a failed stage ends the row (the later
    stages need its result)."""
    import outlierfx

    g = build_architecture(model_type)
    other = build_architecture(model_type, **OTHER_SHAPE).inputs
    state: dict[str, torch.nn.Module] = {}

    def capture() -> None:
        gm = outlierfx.capture(g.model, g.inputs)
        assert_equivalent(g.model, gm, g.inputs, tol=CAPTURE_TOL)
        assert_equivalent(g.model, gm, other, tol=CAPTURE_TOL)

    def naive() -> None:
        state["simulated"], state["report"] = outlierfx.quantize(g.model, [g.inputs], recipe="naive",
                                                                 policy="linear-inputs", progress=False)

    def lower_onednn() -> None:
        state["int8"], _ = outlierfx.lower(state["simulated"], state["report"], "onednn")
        assert_tokens_close(state["simulated"], state["int8"], g.inputs, min_cosine=LOWERED_MIN_COSINE)

    def other_shapes() -> None:
        assert_tokens_close(state["simulated"], state["int8"], other, min_cosine=LOWERED_MIN_COSINE)

    steps: tuple[Callable[[], None], ...] = (capture, naive, lower_onednn, other_shapes)
    outcomes = []
    for stage, step in zip(STAGES, steps):
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - the matrix records any failure of a stage
            first_line = (str(exc).strip().splitlines() or [""])[0]
            outcomes.append(StageOutcome(stage, False, f"{type(exc).__name__}: {first_line[:300]}"))
            break
        outcomes.append(StageOutcome(stage, True))
    return MatrixRow(model_type, tuple(outcomes))
