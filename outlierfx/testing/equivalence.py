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
