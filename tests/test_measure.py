"""The measurement toolkit (``uniattn._measure``): peak memory as the benchmarks and the
conformance suite measure it (Linux only), its timer, the gradients it differentiates,
and the fresh processes it measures in, whose framework log lines stay out of the output."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import uniattn
from uniattn import backends
from uniattn._measure import (
    gradients,
    in_fresh_process,
    interleaved_medians,
    quiet_stderr,
    timed_peak,
    timings,
)

linux_only = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="peak RSS is measured through /proc"
)

MiB = 2**20


class _Wrapped:
    """The NumPy harness with some members replaced (the subclasses say which)."""

    def __init__(self):
        self._harness = backends.harness("numpy")

    def __getattr__(self, name):
        return getattr(self._harness, name)


class _Pooled(_Wrapped):
    """NumPy with a pretend pooling allocator: it reports 64 MiB more at its peak than it
    held before, memory that an earlier call left resident (so RSS does not grow)."""

    def reset_peak_memory(self):
        return 5 * MiB

    def peak_memory(self):
        return 69 * MiB


class _OnAccelerator(_Wrapped):
    """NumPy pretending its arrays live on a GPU whose allocator keeps no statistics."""

    def platform(self, x):
        return "gpu"


@linux_only
def test_peak_counts_a_pooling_allocators_own_peak():
    seconds, peak = timed_peak(_Pooled(), lambda: np.zeros(1), ())
    assert seconds >= 0 and peak == 64 * MiB


@linux_only
def test_peak_counts_resident_growth_where_the_allocator_keeps_no_statistics():
    numpy = backends.harness("numpy")
    assert numpy.reset_peak_memory() is None
    # 64 MiB: above glibc's largest mmap threshold (32 MiB), so always fresh pages, never
    # memory an earlier test freed and left resident.
    _, peak = timed_peak(numpy, lambda: np.ones(64 * MiB // 8), ())
    assert peak >= 60 * MiB


@linux_only
def test_an_accelerators_memory_without_allocator_statistics_is_not_measured():
    # Host RSS says nothing about a GPU's memory: None, never a misleading 0.
    seconds, peak = timed_peak(_OnAccelerator(), lambda x: x + 1, (np.zeros(4),))
    assert seconds >= 0 and peak is None


@linux_only
def test_an_accelerators_memory_is_its_allocators_peak():
    class Counted(_OnAccelerator, _Pooled):
        pass

    assert timed_peak(Counted(), lambda x: x + 1, (np.zeros(4),))[1] == 64 * MiB


def test_timings_warm_up_once_then_take_turns():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "ab"}
    seconds = timings(fns, lambda x: x, repeats=2)
    assert calls == ["a", "b", "a", "b", "a", "b"]
    assert {name: len(t) for name, t in seconds.items()} == {"a": 2, "b": 2}
    calls.clear()
    interleaved_medians({"a": fns["a"]}, lambda x: x, repeats=3, warm=False)
    assert calls == ["a"] * 3


def test_gradients_on_numpy_are_uniattns_own():
    rng = np.random.default_rng(0)
    q, k, v, d_out = (rng.standard_normal((1, 6, 2, 4)) for _ in range(4))
    got = gradients(backends.harness("numpy"), causal=True)(q, k, v, d_out)
    want = uniattn.vjp(q, k, v, causal=True)[1](d_out)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


def test_gradients_of_other_functions_need_autodiff():
    numpy = backends.harness("numpy")
    with pytest.raises(ValueError, match="no autodiff"):
        gradients(numpy, lambda q, k, v: q)
    with pytest.raises(ValueError, match="options"):
        gradients(numpy, uniattn.attention, causal=True)


_NOISY_TASK = """
import os
import sys

from uniattn._measure import emit


def speak(backend, spec):
    os.write(2, b"I0000 00:00:1.0 1 port.cc:153] oneDNN custom operations are on.\\n")
    print("W tensorflow: a warning through Python", file=sys.stderr)
    print("not JSON: ignored", flush=True)
    emit(backend=backend.name)
    if spec.get("fail"):
        raise RuntimeError("asked to fail")
"""


@pytest.fixture
def noisy_task(tmp_path, monkeypatch):
    """A task that logs to stderr as TensorFlow's C++ logging does, importable by the
    fresh process (through PYTHONPATH, which it inherits)."""
    (tmp_path / "noisy_task.py").write_text(textwrap.dedent(_NOISY_TASK))
    path = [str(tmp_path), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in path if p))
    return "noisy_task:speak"


def test_a_fresh_process_logs_nothing_when_it_succeeds(noisy_task, capfd):
    lines = in_fresh_process(noisy_task, {"backend": "numpy"}, timeout=120)
    assert lines == [{"backend": "numpy"}]
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_a_fresh_process_shows_its_stderr_when_it_fails(noisy_task, capfd):
    lines = in_fresh_process(noisy_task, {"backend": "numpy", "fail": True}, timeout=120)
    assert lines == [{"backend": "numpy"}, {"error": "RuntimeError: asked to fail"}]
    err = capfd.readouterr().err
    assert "oneDNN custom operations" in err and "a warning through Python" in err
    assert "RuntimeError: asked to fail" in err  # the traceback


def test_a_fresh_process_that_hangs_is_stopped(tmp_path, monkeypatch):
    (tmp_path / "hangs.py").write_text(
        "import time\n\ndef run(backend, spec):\n    time.sleep(60)\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    lines = in_fresh_process("hangs:run", {"backend": "numpy"}, timeout=2)
    assert lines == [{"error": "timed out after 2 s"}]


def test_quiet_stderr_holds_back_descriptor_2_unless_it_fails(capfd):
    with quiet_stderr():
        os.write(2, b"cuInit failed\n")
    assert capfd.readouterr().err == ""
    with pytest.raises(KeyError), quiet_stderr():
        os.write(2, b"cuInit failed\n")
        raise KeyError("x")
    assert capfd.readouterr().err == "cuInit failed\n"


@pytest.mark.skipif(
    "tensorflow" not in backends.installed(), reason="TensorFlow's log lines need TensorFlow"
)
def test_the_main_job_prints_no_framework_log_lines():
    """``python -m uniattn`` on TensorFlow, whose C++ logging writes on import (oneDNN,
    the CUDA stub, cuInit) past TF_CPP_MIN_LOG_LEVEL: only the table comes out."""
    result = subprocess.run(
        [sys.executable, "-m", "uniattn", "--backend", "tensorflow", "--memory-length", "256"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    assert result.stderr == ""
    (row,) = [line for line in result.stdout.splitlines() if line.startswith("tensorflow ")]
    assert len(row.split()) == 9, result.stdout  # the row is whole
    for marker in ("absl", "oneDNN", "cuInit", "cuda", "I0000", "W0000", "E0000"):
        assert marker not in result.stdout, result.stdout
