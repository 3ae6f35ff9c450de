"""``outlierfx bench speed``'s check that the machine had a core for each runnable thread while
the rounds ran (``speed.oversubscription``): on a shared machine an eager path of many short
OpenMP regions (onednn's decode step) waits for cores far more than a compiled one."""

import os
import pathlib

import pytest

from outlierfx.speed import TimedCall, counting_load, oversubscription, runnable_tasks


def test_oversubscription_counts_runnable_threads_beyond_the_cores():
    cores = os.cpu_count()
    assert oversubscription([cores + 2, cores, cores - 1]) == pytest.approx(2 / 3)
    assert oversubscription([1] * 4) == 0.0
    assert oversubscription([]) == 0.0


@pytest.mark.skipif(not pathlib.Path("/proc/loadavg").is_file(), reason="no /proc/loadavg")
def test_each_timed_call_samples_the_load_before_its_untimed_prepare():
    samples, prepared = [], []
    call = counting_load(TimedCall(lambda: "ran", lambda: prepared.append(len(samples))), samples)
    call.prepare()
    assert call.run() == "ran"
    assert prepared == [1]  # sampled first, then the call's own prepare
    assert samples[0] >= 1 and samples[0] == int(samples[0])  # this test's own thread is running
    assert runnable_tasks() >= 1
