"""call_with_stack_headroom: a step of many shallow Python calls maps no data-stack chunk per
call, from any caller depth (CPython's 16 KB frame chunks, outlierfx/stack_headroom.py)."""

from __future__ import annotations

import resource
import sys

import pytest
import torch

import outlierfx
from outlierfx.backends import runnable_backends
from outlierfx.stack_headroom import call_with_stack_headroom
from outlierfx.testing.models import build_model

CALLS_PER_STEP = 100
STEPS = 20


def _shallow(n: int) -> int:
    return _shallow(n - 1) if n else 0


def _step() -> int:
    """What a graph's forward does to the data stack: many short calls from one frame."""
    return sum(_shallow(4) for _ in range(CALLS_PER_STEP))


def _at_depth(depth: int, fn):
    return _at_depth(depth - 1, fn) if depth else fn()


def _faults_per_step(step, steps: int = STEPS) -> float:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / steps


def _faults_by_depth(call, steps: int = STEPS, every: int = 1) -> dict[int, float]:
    """Page faults a call by caller depth, over depths that span more than one 16 KB chunk (a
    frame of _at_depth is ~100 bytes)."""
    return {depth: _at_depth(depth, lambda: _faults_per_step(call, steps)) for depth in range(0, 400, every)}


def _worst_depth(step) -> tuple[float, int]:
    """The most page faults a step takes, and from which caller depth."""
    return max((faults, depth) for depth, faults in _faults_by_depth(step).items())


def _thrashing(faults: dict[int, float], excess: float = 20) -> list[int]:
    """The depths whose calls take more than ``excess`` faults above the median depth's."""
    median = sorted(faults.values())[len(faults) // 2]
    return [depth for depth, f in faults.items() if f > median + excess]


def test_the_call_returns_what_the_function_returns_and_raises_what_it_raises():
    assert call_with_stack_headroom(lambda a, b=1, *, c: (a, b, c), 1, c=3) == (1, 1, 3)
    with pytest.raises(KeyError, match="missing"):
        call_with_stack_headroom({}.__getitem__, "missing")


@pytest.mark.skipif(sys.implementation.name != "cpython" or sys.version_info < (3, 11),
                    reason="CPython's frame data-stack chunks came with 3.11")
def test_no_caller_depth_makes_a_step_fault_once_per_call():
    plain, depth = _worst_depth(_step)
    # The effect this guards against exists here: from some depth every short call maps and
    # faults in a chunk (a fault or more per call; none from most depths).
    assert plain >= CALLS_PER_STEP / 2, f"no thrashing depth found (worst {plain} faults a step at depth {depth})"
    guarded, depth = _worst_depth(lambda: call_with_stack_headroom(_step))
    # One chunk a step: the pages of the frames beneath it, a few.
    assert guarded <= 8, f"{guarded} page faults a step from caller depth {depth}"


@pytest.mark.skipif(sys.implementation.name != "cpython" or sys.version_info < (3, 11),
                    reason="CPython's frame data-stack chunks came with 3.11")
@pytest.mark.parametrize("backend", runnable_backends(["onednn"]))
def test_a_lowered_model_called_with_the_headroom_faults_at_no_caller_depth(backend):
    g = build_model("bert", batch=1, seq=8, pad=False)
    qmodel, _ = outlierfx.quantize(g.model, [g.inputs], "naive", backend=backend, progress=False)

    def direct() -> None:
        with torch.no_grad():
            qmodel(**g.inputs)

    def guarded() -> None:
        call_with_stack_headroom(direct)

    direct()
    # A thrashing depth: a call takes a fault per short Python call (dozens here) more than from
    # most depths; tensors' own allocations fault the same at every depth.
    guarded_faults = _faults_by_depth(guarded, steps=3, every=2)
    assert _thrashing(guarded_faults) == [], f"faults a call by caller depth: {guarded_faults}"
    direct_faults = _faults_by_depth(direct, steps=3, every=2)  # the effect exists for a real graph's forward
    assert _thrashing(direct_faults), f"no thrashing depth found: {direct_faults}"


def test_a_causal_lm_runs_every_graph_call_with_the_headroom(monkeypatch):
    from outlierfx import generation

    g = build_model("llama", batch=1, seq=8, pad=False)
    qmodel, _ = outlierfx.quantize(g.model, [g.inputs], "naive", progress=False)
    calls = []

    def counted(fn, *args, **kwargs):
        calls.append(fn)
        return call_with_stack_headroom(fn, *args, **kwargs)

    monkeypatch.setattr(generation, "call_with_stack_headroom", counted)
    prompt = g.inputs["input_ids"]
    new_tokens = qmodel.generate(prompt, max_new_tokens=3).shape[1] - prompt.shape[1]
    # the prefill, then one step per later token (fewer if the text ended)
    assert len(calls) == new_tokens >= 1 and all(fn is qmodel.cache_writer() for fn in calls)
    qmodel(prompt)
    assert len(calls) == new_tokens + 1
