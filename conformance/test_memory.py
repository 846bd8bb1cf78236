"""Extra memory never grows with the n x n score matrix (peak RSS in a fresh process, or a
pooling allocator's own peak where that is larger: ``uniattn._measure.timed_peak``).

Memory, unlike time, is deterministic enough to assert: the bound is half of ONE float32
score matrix (at n 4096 on a CPU, 16384 on an accelerator), where plain attention holds
several and uniattn needs O(n·d) and a few chunks. This caught TensorFlow's eager tape
keeping every chunk's scores alive inside ``tf.custom_gradient``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from uniattn._measure import memory_in_subprocess


def _length(backend) -> int:
    """4096 on a CPU; on an accelerator, whose default chunks are up to 2048 x 4096 (half
    of the scores at 4096), 16384: there a chunk is at most 1/32 of the score matrix."""
    return 4096 if backend.array_platform() == "cpu" else 16384


@pytest.fixture(autouse=True)
def _linux_only():
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("peak RSS is measured through /proc (Linux)")


def _peak(backend, task: str) -> tuple[dict, int]:
    """Peak extra bytes of each implementation, and the bytes of one float32 score matrix."""
    device = None if backend.array_device is None else str(backend.array_device)
    n = _length(backend)
    peak = memory_in_subprocess(backend.name, n, task, device)
    if None in peak.values():
        pytest.skip(f"{backend.name} keeps no allocator statistics on {device}: not measured")
    return peak, n * n * 4


def test_forward_memory_is_below_the_score_matrix(backend):
    peak, one_matrix = _peak(backend, "forward")
    assert peak["uniattn"] < one_matrix / 2, peak
    assert peak["plain"] > one_matrix, peak  # the measurement does see n x n arrays


def test_gradient_memory_is_below_the_score_matrix(backend):
    peak, one_matrix = _peak(backend, "gradient")
    assert peak["custom"] < one_matrix / 2, peak
    if "plain" in peak:
        assert peak["plain"] > one_matrix, peak


def test_eager_decoding_step_holds_no_copy_of_the_cache(backend):
    """One eager decoding step (BHTD) from a cache of 16384 keys takes less extra memory
    than a quarter of the cache (k and v). This caught JAX copying the cache in the layout
    changes made outside its compiled function (72 MiB above a 64 MiB cache)."""
    device = None if backend.array_device is None else str(backend.array_device)
    measured = memory_in_subprocess(backend.name, 16384, "decode", device)
    if measured["uniattn"] is None:
        pytest.skip(f"{backend.name} keeps no allocator statistics on {device}: not measured")
    assert measured["uniattn"] < measured["cache"] / 4, measured
