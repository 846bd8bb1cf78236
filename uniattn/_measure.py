"""Time and peak memory of attention implementations, measured the same way for all.

Memory is the peak resident set size (``VmHWM``) above the resident size just before
the call, in a fresh process per backend, with glibc's dynamic mmap threshold pinned so
freed buffers go back to the OS. The peak is reset (``/proc/self/clear_refs``) before
each measured call, after a warm-up call of the same shape (compilation, kernel
loading). Where the framework's allocator pools memory and keeps statistics (TensorFlow
with oneDNN on), its own peak counts where it is larger (:func:`timed_peak`). On an
accelerator only the allocator's statistics count (torch's CUDA allocator keeps them;
where an adapter has none, the peak is not measured: None). It includes the output,
which is O(n·d).

Run as ``python -m uniattn._measure BACKEND N forward|gradient [DEVICE]`` to print one
JSON line.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path


def median_time(fn, block, repeats: int = 3) -> float:
    """Median wall time in seconds of ``block(fn())`` over ``repeats`` calls after a warm-up."""
    block(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        block(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _status(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) * 1024


def timed_peak(backend, run, args: tuple) -> tuple[float, int | None]:
    """Seconds and peak extra bytes of one ``run(*args)``, compiled and warmed up before.

    The peak is the larger of two lower bounds: the growth of the resident set (``VmHWM``,
    reset first, over ``VmRSS`` before the call), which misses memory that a pooling
    allocator holds from an earlier call and reuses, and the framework allocator's own
    peak above what it held before (:meth:`Backend.reset_peak_memory`, where it keeps
    statistics), which misses what the framework takes outside that allocator. Arrays on
    an accelerator are measured by the allocator alone, and not at all (None) where it
    keeps no statistics.
    """
    on_host = not args or backend.platform(args[0]) == "cpu"
    held = backend.reset_peak_memory()
    baseline = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start = time.perf_counter()
    backend.block(run(*args))
    seconds = time.perf_counter() - start
    resident = _status("VmHWM") - baseline if on_host else 0
    if held is None:
        return seconds, max(0, resident) if on_host else None
    return seconds, max(0, resident, backend.peak_memory() - held)


def peak_bytes_above_baseline(backend, fn, *args) -> int | None:
    """Peak extra bytes of one ``fn(*args)`` (compiled and warmed up first, see
    :func:`timed_peak`)."""
    return timed_peak(backend, backend.precompile(fn, *args), args)[1]


def memory_in_subprocess(
    backend: str, n: int, task: str = "forward", device: str | None = None, timeout: float = 600
):
    """Peak extra bytes of each implementation at length ``n`` (1 head, d=64, float32),
    on ``device`` (the framework's name for it; None: its default device).

    ``task`` "forward" measures ``{"uniattn", "plain"}``; "gradient" measures a forward and
    backward pass: ``{"custom", "autodiff", "plain"}`` (plain under the framework's
    autodiff; NumPy: ``{"custom"}`` through ``uniattn.vjp``); "decode" measures
    ``{"uniattn"}``, one eager decoding step from a cache of ``n`` keys, beside the
    cache's own bytes ``{"cache"}`` (:func:`_decode`). None where peak RSS cannot be
    measured (not Linux); each value None where the device's memory is not measured.
    """
    if not Path("/proc/self/clear_refs").exists():
        return None
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "-m", "uniattn._measure", backend, str(n), task]
        + ([] if device is None else [device]),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def _worker(name: str, n: int, task: str, device: str | None = None) -> dict:
    import numpy as np

    import uniattn
    from uniattn import backends
    from uniattn._plain import plain_attention

    backend = backends.load(name)
    backend = backend if device is None else backend.on(device)
    rng = np.random.default_rng(0)
    if task == "decode":
        return _decode(backend, rng, n)
    q, k, v, d_out = (
        backend.asarray(rng.standard_normal((1, n, 1, 64)), "float32") for _ in range(4)
    )
    if task == "forward":
        runs = {"uniattn": uniattn.attention, "plain": lambda *a: plain_attention(backend, *a)}
    elif not backend.has_autodiff:
        runs = {"custom": lambda q, k, v, d: uniattn.vjp(q, k, v)[1](d)}
    else:

        def gradient(fn):
            return lambda q, k, v, d: backend.vjp(fn, q, k, v)[1](d)

        runs = {
            "custom": gradient(lambda *a: uniattn.attention(*a, backward="custom")),
            "autodiff": gradient(lambda *a: uniattn.attention(*a, backward="autodiff")),
            "plain": gradient(lambda *a: plain_attention(backend, *a)),
        }
    args = (q, k, v) if task == "forward" else (q, k, v, d_out)
    return {impl: peak_bytes_above_baseline(backend, run, *args) for impl, run in runs.items()}


def _decode(backend, rng, n: int) -> dict:
    """Peak extra bytes of one decoding step (``"uniattn"``) and the bytes of its cache, k
    and v (``"cache"``): 32 query heads on 8 key/value heads, d 64, float32, layout BHTD,
    ``n`` keys. Called eagerly (after a warm-up), as a decoding loop calls it, so that what
    runs outside a staged function counts too."""
    import uniattn

    q = backend.asarray(rng.standard_normal((1, 32, 1, 64)), "float32")
    k, v = (backend.asarray(rng.standard_normal((1, 8, n, 64)), "float32") for _ in "kv")

    def step(q, k, v):
        return uniattn.attention(q, k, v, layout="BHTD")

    backend.block(step(q, k, v))
    cache = 2 * math.prod(k.shape) * 4
    return {"uniattn": timed_peak(backend, step, (q, k, v))[1], "cache": cache}


if __name__ == "__main__":
    print(json.dumps(_worker(sys.argv[1], int(sys.argv[2]), *sys.argv[3:5])))
