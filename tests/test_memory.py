"""Freed memory goes back to the operating system: glibc's thresholds around a low-memory run,
and the heap kept for reuse while a pass trains."""

import subprocess
import sys

import pytest

from outlierfx import memory

# Run in a fresh process: a long-lived one (a test worker) has free heap blocks that glibc
# reuses before mapping anything, whatever the threshold.
_SCRIPT = """
import ctypes, torch
from outlierfx import memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = memory._libc()
if libc is None or not hasattr(libc, "mallinfo2"):
    print("SKIP")
    raise SystemExit
libc.mallinfo2.restype = MallInfo2
mapped = lambda: libc.mallinfo2().hblkhd  # bytes in blocks mapped on their own
freed = torch.empty(16 * 2**20, dtype=torch.uint8)
del freed  # glibc's dynamic rule now serves blocks below 16 MB from its heap
with memory.freed_memory_returned_at_once():
    before = mapped()
    kept = [torch.empty(2**20, dtype=torch.uint8) for _ in range(16)]
    inside = mapped() - before
    del kept
    left = mapped() - before
    with memory.heap_kept_for_reuse():  # a training pass's steps
        before = mapped()
        kept = [torch.empty(2**20, dtype=torch.uint8) for _ in range(16)]
        training = mapped() - before
        del kept
before = mapped()
kept = [torch.empty(2**20, dtype=torch.uint8) for _ in range(16)]
print(inside, left, training, mapped() - before)
"""


def test_a_low_memory_run_maps_each_block_of_128_kb_or_more_on_its_own_but_while_a_pass_trains():
    done = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=300, check=True)
    if done.stdout.strip() == "SKIP":
        pytest.skip("needs glibc 2.33 or later (mallinfo2)")
    inside, left, training, after = map(int, done.stdout.split())
    assert inside >= 16 * 2**20  # each 1 MB block mapped on its own
    assert left < 2**20  # and unmapped as it was freed: nothing stays resident
    assert training < 8 * 2**20  # a pass that trains gets them from the heap
    assert after < 8 * 2**20  # afterwards the heap serves them again, as glibc's rule leaves a process
    assert memory.GLIBC_INITIAL_THRESHOLD <= 2**20 < memory.GLIBC_CEILING_MMAP_THRESHOLD


class _RecordingLibc:
    """Stands in for glibc: records the mallopt and malloc_trim calls instead of making them."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def mallopt(self, param, value):
        self.calls.append((param, value))

    def malloc_trim(self, pad):
        self.calls.append(("trim", pad))


def test_heap_kept_for_reuse_is_a_no_op_outside_a_low_memory_run_and_restores_the_run_s_thresholds(monkeypatch):
    libc = _RecordingLibc()
    calls = libc.calls
    monkeypatch.setattr(memory, "_libc", lambda: libc)
    with memory.heap_kept_for_reuse():
        pass
    assert calls == []
    with memory.freed_memory_returned_at_once():
        with memory.heap_kept_for_reuse():
            assert calls[-2:] == [(memory._M_MMAP_THRESHOLD, memory.GLIBC_CEILING_MMAP_THRESHOLD),
                                  (memory._M_TRIM_THRESHOLD, 2 * memory.GLIBC_CEILING_MMAP_THRESHOLD)]
        assert calls[-3:-1] == [(memory._M_MMAP_THRESHOLD, memory.GLIBC_INITIAL_THRESHOLD),
                                (memory._M_TRIM_THRESHOLD, memory.GLIBC_INITIAL_THRESHOLD)]
    assert calls[-3:] == [(memory._M_MMAP_THRESHOLD, memory.GLIBC_CEILING_MMAP_THRESHOLD),
                          (memory._M_TRIM_THRESHOLD, 2 * memory.GLIBC_CEILING_MMAP_THRESHOLD), ("trim", 0)]


def test_the_passes_that_train_or_search_say_so():
    from outlierfx.passes.calibrate import Calibrate
    from outlierfx.passes.clip_tokenwise import ClipTokenwise
    from outlierfx.passes.convert_fake_quant import ConvertToFakeQuant
    from outlierfx.passes.learn_ranges import LearnRanges
    from outlierfx.passes.qat import QAT
    from outlierfx.passes.train_quadapter import TrainQuadapter

    assert all(p.trains_or_searches for p in (TrainQuadapter, LearnRanges, ClipTokenwise, QAT))
    assert not any(p.trains_or_searches for p in (Calibrate, ConvertToFakeQuant))


def test_a_pass_that_trains_runs_with_the_heap_kept_for_reuse_inside_a_low_memory_run(monkeypatch):
    import torch.fx

    from outlierfx.passes.base import GraphPass

    class Probe(GraphPass[None]):
        def analyze(self, gm):
            seen.append(list(memory._fixed))

        def apply(self, gm, plan):
            return False

    class Trains(Probe):
        trains_or_searches = True

    libc = _RecordingLibc()
    monkeypatch.setattr(memory, "_libc", lambda: libc)
    gm = torch.fx.symbolic_trace(torch.nn.Identity())
    seen: list[list[int]] = []
    with memory.freed_memory_returned_at_once():
        Probe()(gm)
        Trains()(gm)
    Trains()(gm)
    initial, ceiling = memory.GLIBC_INITIAL_THRESHOLD, memory.GLIBC_CEILING_MMAP_THRESHOLD
    assert seen == [[initial], [initial, ceiling], []]
