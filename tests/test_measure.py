"""Peak memory as the benchmarks and the conformance suite measure it (Linux only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from uniattn import backends
from uniattn._measure import timed_peak

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="peak RSS is measured through /proc"
)

MiB = 2**20


class _Pooled(type(backends.load("numpy"))):
    """NumPy with a pretend pooling allocator: it reports 64 MiB more at its peak than it
    held before, memory that an earlier call left resident (so RSS does not grow)."""

    def reset_peak_memory(self):
        return 5 * MiB

    def peak_memory(self):
        return 69 * MiB


def test_peak_counts_a_pooling_allocators_own_peak():
    seconds, peak = timed_peak(_Pooled(), lambda: np.zeros(1), ())
    assert seconds >= 0 and peak == 64 * MiB


def test_peak_counts_resident_growth_where_the_allocator_keeps_no_statistics():
    numpy = backends.load("numpy")
    assert numpy.reset_peak_memory() is None
    # 64 MiB: above glibc's largest mmap threshold (32 MiB), so always fresh pages, never
    # memory an earlier test freed and left resident.
    _, peak = timed_peak(numpy, lambda: np.ones(64 * MiB // 8), ())
    assert peak >= 60 * MiB


class _OnAccelerator(type(backends.load("numpy"))):
    """NumPy pretending its arrays live on a GPU whose allocator keeps no statistics."""

    def platform(self, x):
        return "gpu"


def test_an_accelerators_memory_without_allocator_statistics_is_not_measured():
    # Host RSS says nothing about a GPU's memory: None, never a misleading 0.
    seconds, peak = timed_peak(_OnAccelerator(), lambda x: x + 1, (np.zeros(4),))
    assert seconds >= 0 and peak is None


def test_an_accelerators_memory_is_its_allocators_peak():
    class Counted(_OnAccelerator, _Pooled):
        pass

    assert timed_peak(Counted(), lambda x: x + 1, (np.zeros(4),))[1] == 64 * MiB
