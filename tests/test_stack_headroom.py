"""call_with_stack_headroom: a step of many shallow Python calls maps no data-stack chunk per
call, from any caller depth (CPython's 16 KB frame chunks, outlierfx/stack_headroom.py)."""

from __future__ import annotations

import resource
import sys

import pytest

from outlierfx.stack_headroom import call_with_stack_headroom

CALLS_PER_STEP = 100
STEPS = 20


def _shallow(n: int) -> int:
    return _shallow(n - 1) if n else 0


def _step() -> int:
    """What a graph's forward does to the data stack: many short calls from one frame."""
    return sum(_shallow(4) for _ in range(CALLS_PER_STEP))


def _at_depth(depth: int, fn):
    return _at_depth(depth - 1, fn) if depth else fn()


def _faults_per_step(step) -> float:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(STEPS):
        step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / STEPS


def _worst_depth(step) -> tuple[float, int]:
    """The most page faults a step takes, and from which caller depth, over depths that span
    more than one 16 KB chunk (a frame of _at_depth is ~100 bytes)."""
    return max((_at_depth(depth, lambda: _faults_per_step(step)), depth) for depth in range(0, 400))


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
