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
(``tests/test_stack_headroom.py`` checks the same effect in plain Python).

:func:`call_with_stack_headroom` runs a call inside a frame that declares a large, never-touched
evaluation stack, so the frame cannot fit in an ordinary chunk: each call maps one chunk of its
own, with room for everything the call does below it. One ``mmap`` and a few page faults a call
(microseconds) instead of one per op, from any caller depth. On an interpreter without data-stack
chunks the frame is merely larger.

:func:`give_forward_stack_headroom` does the same to an FX graph module's own ``forward``, for the
lowered models users call directly (an encoder answering one short query is a call of many short
Python calls, as a decode step is).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any, TypeVar

import torch.fx

T = TypeVar("T")

# Where the number comes from (CPython's Python/pystate.c, push_chunk): a frame that does not fit
# gets a chunk of 16 KB doubled until it holds the frame plus 1,000 slots (8 KB). 7,300 slots
# (57 KB) is more than any chunk up to 64 KB can have left, so the frame always starts a chunk of
# its own, of 128 KB, leaving ~70 KB for the call beneath it: a decode step reaches 18 frames
# (~2 KB) below a graph's ``forward``, and SmolLM2's ``forward`` frame itself is ~20 KB. The
# slots are never written, so only the pages the call actually uses are faulted in.
HEADROOM_SLOTS = 7300


def with_stack_headroom(code: types.CodeType) -> types.CodeType:
    """``code`` declaring ``HEADROOM_SLOTS`` more evaluation stack than it uses (never touched)."""
    return code.replace(co_stacksize=code.co_stacksize + HEADROOM_SLOTS)


def _call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return fn(*args, **kwargs)


_call.__code__ = with_stack_headroom(_call.__code__)


def call_with_stack_headroom(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, from a frame that gives the call a data-stack chunk of its own
    (see the module docstring): its speed no longer depends on the caller's stack depth."""
    return _call(fn, args, kwargs)


def give_forward_stack_headroom(gm: torch.fx.GraphModule) -> None:
    """Make ``gm``'s ``forward`` (its class's: FX gives every graph module a class of its own) run
    in a data-stack chunk of its own on every call, until ``gm.recompile()`` writes a new one."""
    forward = type(gm).forward
    if forward.__code__.co_stacksize < HEADROOM_SLOTS:
        forward.__code__ = with_stack_headroom(forward.__code__)
