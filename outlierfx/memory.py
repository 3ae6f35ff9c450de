"""Give the heap memory a run has freed back to the operating system (glibc's ``malloc_trim``)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # a libc without it (musl): nothing to give back this way
        return None


def return_freed_memory() -> None:
    """Hand the freed pages of the C heap back to the operating system.

    Quantizing and loading free many tensors of a few MB (float copies of weights, example-run
    activations). glibc serves allocations below its mmap threshold, which rises to 32 MB as
    large blocks are freed, from its heap, so those tensors sit between ones that stay alive and
    their pages are not returned: the process keeps its peak resident size. Measured on SmolLM2
    (docs/experiments/memory.md): a loaded int8 model at 2.1 GB resident, 1.06 GB after this.
    A no-op off glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
