"""``assert_equivalent``: the one output-equality check the test-suite uses."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..graph.compare import OutputError, output_error, run


def _as_call(inputs: Any) -> tuple[tuple, dict]:
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[1], dict) and isinstance(inputs[0], tuple):
        return inputs
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    return tuple(inputs), {}


def assert_equivalent(
    reference: torch.nn.Module, transformed: torch.nn.Module, inputs: Any, tol: float = 1e-5
) -> OutputError:
    """Assert both modules give the same outputs on ``inputs`` within ``tol``.

    ``tol`` is relative to the reference output's max magnitude (see
    :class:`~outlierfx.graph.compare.OutputError`); NaN or inf where the reference is finite
    always fails. Returns the measured error so tests can report it.
    """
    call = _as_call(inputs)
    error = output_error(run(reference, call), run(transformed, call))
    if not error.within(tol):
        raise AssertionError(
            f"outputs differ: max abs error {error.max_abs:.3g} = {error.max_rel:.3g} of max |reference| "
            f"{error.reference_max:.3g} (tolerance {tol:g}); new non-finite values: {error.nonfinite}"
        )
    return error


def assert_tokens_close(reference: torch.nn.Module, candidate: torch.nn.Module, inputs: dict[str, torch.Tensor],
                        min_cosine: float = 0.999) -> float:
    """Assert every real token's ``last_hidden_state`` (decoders: ``logits``) of ``candidate``
    has cosine at least ``min_cosine`` with ``reference``'s (for int8 graphs, where rounding ties
    move single values by one step and a relative tolerance is the wrong measure). Returns the
    lowest cosine."""
    with torch.no_grad():
        ref, out = (per_token_output(m(**inputs)) for m in (reference, candidate))
    real = inputs["attention_mask"].bool()
    lowest = float(torch.nn.functional.cosine_similarity(ref[real], out[real], dim=-1).min())
    if lowest < min_cosine:
        raise AssertionError(f"a token's hidden state has cosine {lowest:.6f} < {min_cosine} with the reference")
    return lowest


def per_token_output(output: object) -> torch.Tensor:
    """A model output's per-token tensor: ``last_hidden_state`` (encoders) or ``logits``."""
    hidden = getattr(output, "last_hidden_state", None)
    return hidden if hidden is not None else output.logits  # type: ignore[attr-defined]
