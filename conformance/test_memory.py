"""Extra memory never grows with the n x n score matrix (peak RSS in a fresh process, or a
pooling allocator's own peak where that is larger: ``uniattn._measure.timed_peak``).

Memory, unlike time, is deterministic enough to assert: the bound is half of ONE float32
score matrix, where plain attention holds several (uniattn needs O(n·d): a few MiB here). This caught TensorFlow's eager
tape keeping every chunk's scores alive inside ``tf.custom_gradient``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from uniattn._measure import memory_in_subprocess

N = 4096
ONE_SCORE_MATRIX = N * N * 4


@pytest.fixture(autouse=True)
def _linux_only():
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("peak RSS is measured through /proc (Linux)")


def test_forward_memory_is_below_the_score_matrix(backend):
    peak = memory_in_subprocess(backend.name, N, "forward")
    assert peak["uniattn"] < ONE_SCORE_MATRIX / 2, peak
    assert peak["plain"] > ONE_SCORE_MATRIX, peak  # the measurement does see n x n arrays


def test_gradient_memory_is_below_the_score_matrix(backend):
    peak = memory_in_subprocess(backend.name, N, "gradient")
    assert peak["custom"] < ONE_SCORE_MATRIX / 2, peak
    if "plain" in peak:
        assert peak["plain"] > ONE_SCORE_MATRIX, peak
