"""Give the heap memory a run has freed back to the operating system (glibc's ``malloc_trim``
and ``mallopt``)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import sys
from collections.abc import Iterator

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
GLIBC_INITIAL_THRESHOLD = 128 * 1024
"""glibc's own initial mmap and trim thresholds (malloc.h's DEFAULT_MMAP_THRESHOLD_MIN and
DEFAULT_TRIM_THRESHOLD), which its dynamic rule raises as large blocks are freed."""
GLIBC_CEILING_MMAP_THRESHOLD = 32 * 1024 * 1024
"""Where glibc's dynamic rule stops raising the mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX,
the trim threshold following at twice it): the state a process that has freed a tensor of 32 MB
or more is in."""


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    # a libc without them (musl): nothing to give back this way
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def return_freed_memory() -> None:
    """Hand the freed pages of the C heap back to the operating system.

    Quantizing and loading free many tensors of a few MB (float copies of weights, example-run
    activations). glibc serves allocations below its mmap threshold, which rises to 32 MB as
    large blocks are freed, from its heap, so those tensors sit between ones that stay alive and
    their pages are not returned: the process keeps its peak resident size. Measured on SmolLM2
    (docs/experiments/memory.md): a loaded int8 model at 2.1 GB resident, 1.06 GB after this.
    A no-op off glibc."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


_fixed: list[int] = []
"""The thresholds the ``with`` blocks below have set, innermost last (empty: glibc's own rule)."""


def _set_thresholds(libc: ctypes.CDLL, mmap_threshold: int) -> None:
    libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
    # glibc's pairs: 128 KB for both at start, trim at twice the mmap threshold once it rises
    trim = GLIBC_INITIAL_THRESHOLD if mmap_threshold <= GLIBC_INITIAL_THRESHOLD else 2 * mmap_threshold
    libc.mallopt(_M_TRIM_THRESHOLD, trim)


@contextlib.contextmanager
def _thresholds_fixed_at(mmap_threshold: int) -> Iterator[None]:
    libc = _libc()
    if libc is None:
        yield
        return
    _fixed.append(mmap_threshold)
    _set_thresholds(libc, mmap_threshold)
    try:
        yield
    finally:
        _fixed.pop()
        # glibc offers no way back to its dynamic rule: outside every block the thresholds stay
        # where that rule leaves a torch process (32 MB, trim at 64 MB)
        _set_thresholds(libc, _fixed[-1] if _fixed else GLIBC_CEILING_MMAP_THRESHOLD)
        return_freed_memory()


def freed_memory_returned_at_once() -> contextlib.AbstractContextManager[None]:
    """For the ``with`` block, glibc returns each freed block of 128 KB or more to the operating
    system as it is freed: such blocks are mapped on their own (``M_MMAP_THRESHOLD``) and the
    heap's free top is trimmed (``M_TRIM_THRESHOLD``), both at glibc's initial 128 KB, which
    its dynamic rule would otherwise raise to 32 MB as tensors are freed.

    For a low-memory quantization: its activations, reloaded weights and check outputs are
    tensors of a few hundred KB to a few MB, allocated and freed block after block; served from
    the heap, their freed pages stay resident between live ones (SmolLM2's weight-free peak
    spread over 1,036-1,193 MB, 982-984 MB with this; docs/experiments/memory.md, section 5),
    and ``malloc_trim`` between passes cannot reach what a pass frees inside itself. The price
    is a fresh mapping (page faults) per such tensor, which loops of training steps cannot
    afford: they run inside :func:`heap_kept_for_reuse`. A no-op off glibc."""
    return _thresholds_fixed_at(GLIBC_INITIAL_THRESHOLD)


def heap_kept_for_reuse() -> contextlib.AbstractContextManager[None]:
    """Inside :func:`freed_memory_returned_at_once`, glibc serves blocks below 32 MB from its
    heap again for this ``with`` block, as it does in a process left to its own rule; outside
    one, nothing changes. For passes that train or search (``GraphPass.trains_or_searches``):
    they allocate and free the same tensors of a few hundred KB every step, thousands of times,
    and a fresh mapping each time made MiniLM's low-memory preset 3.9x slower (585 s vs 151 s;
    docs/experiments/memory.md, section 5). Their freed blocks stay in the heap until the next
    ``malloc_trim`` (the pass manager's, after the pass)."""
    return _thresholds_fixed_at(GLIBC_CEILING_MMAP_THRESHOLD) if _fixed else contextlib.nullcontext()
