"""Calls whose Python frames cannot thrash CPython's frame data stack.

CPython (3.11 and later) keeps the frames of Python calls in 16 KB chunks of a per-thread data
stack. A call that does not fit in the current chunk maps a new one (``mmap``), and the chunk is
unmapped as soon as that call returns. A model step is one long Python function (an FX graph's
``forward``) that calls hundreds of short, shallow Python functions (op wrappers, custom ops,
quantize helpers); where the caller's stack depth puts the top of ``forward``'s frame just below
a chunk's end, every one of those calls maps, faults in and unmaps a fresh chunk. Measured on a
lowered onednn SmolLM2 decode step called from the benchmark's stack depth: ~490 ``mmap``/
``munmap`` pairs and ~1,000 page faults a step, 66-90 ms a step instead of 35-49 ms
(docs/experiments/rotation.md, "The bench's slow onednn decode step"); on a generated 4-layer
Llama, 55-130 faults a step from caller depths 90-102 and 228-237, none from the others
(``tests/test_stack_headroom.py`` checks the same effect in plain Python and on a lowered model).

:func:`call_with_stack_headroom` runs a call inside a frame that declares a large, never-touched
evaluation stack, so the frame cannot fit in an ordinary chunk: each call maps one chunk of its
own, with room for everything the call does below it. One ``mmap`` and a few page faults a call
(microseconds) instead of one per op, from any caller depth. On an interpreter without data-stack
chunks the frame is merely larger.

Only the call sites get the headroom, not a graph module's own ``forward``: given the same slots,
SmolLM2's decode graph took 326 page faults a step at every caller depth (50 against 37 ms; cause
not found: possibly the frame objects that warnings materialise, which are sized by the declared
stack), where the bare trampoline costs 2-3.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

# Where the number comes from (CPython's Python/pystate.c, push_chunk, 3.11 to 3.13): a frame
# that does not fit gets a chunk of 16 KB doubled until it holds the frame plus 1,000 slots
# (MINIMUM_OVERHEAD, 8 KB). 7,300 slots (57 KB) is more than any chunk up to 64 KB can have left,
# so the trampoline's frame always starts a chunk of its own, of 128 KB, with ~70 KB beneath it:
# a graph's ``forward`` frame (one slot per graph value: ~13 KB for a generated 30-layer Llama)
# plus the 18 frames (~2 KB) a decode step reaches below it. The slots are never written, so only
# the pages the call actually uses are faulted in.
HEADROOM_SLOTS = 7300


def _call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return fn(*args, **kwargs)


# the declared stack: HEADROOM_SLOTS more than the call uses, never touched
_call.__code__ = _call.__code__.replace(co_stacksize=_call.__code__.co_stacksize + HEADROOM_SLOTS)


def call_with_stack_headroom(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, from a frame that gives the call a data-stack chunk of its own
    (see the module docstring): its speed no longer depends on the caller's stack depth."""
    return _call(fn, args, kwargs)

