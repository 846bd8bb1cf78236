"""How uniattn's figures are taken: one toolkit for ``python -m uniattn``,
``python -m uniattn.bench`` and the tests.

Time
    :func:`timings` and :func:`interleaved_medians`: medians of repeated calls, the
    functions taking turns, each call waited for (``Harness.block``).
Memory
    :func:`timed_peak`: the peak resident set size (``VmHWM``) above the resident size just
    before the call, reset (``/proc/self/clear_refs``) before each measured call, after a
    warm-up call of the same shape (compilation, kernel loading). Where the framework's
    allocator pools memory and keeps statistics (TensorFlow with oneDNN on), its own peak
    counts where it is larger. On an accelerator only the allocator's statistics count
    (torch's CUDA allocator keeps them; where a harness has none, the peak is not
    measured: None). It includes the output, which is O(n·d).
    :func:`memory_in_subprocess`: that peak for uniattn and plain attention, in a fresh
    process with glibc's dynamic mmap threshold pinned so freed buffers go back to the OS.
Gradients
    :func:`gradients`: the gradients of a call through the framework's autodiff, or
    ``uniattn.vjp`` where the backend has none (NumPy).
Fresh processes
    :func:`in_fresh_process` runs a task function in a new Python process and collects
    the JSON lines it writes with :func:`emit`; the process's stderr (framework log lines)
    is shown only when it fails.
Quiet frameworks
    :func:`quiet_stderr` and :func:`harness`: TensorFlow's C++ logging writes to file
    descriptor 2 before anything can configure it (oneDNN, CUDA stub and ``cuInit`` lines
    on import), so output stays clean only if that descriptor is captured while a
    framework loads and runs.

Run as ``python -m uniattn._measure BACKEND N forward|gradient|decode [DEVICE]`` to print
one JSON line, what :func:`memory_in_subprocess` returns (without the pinned threshold
unless the environment sets ``MALLOC_MMAP_THRESHOLD_``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def timings(
    fns: dict, block: Callable, repeats: int, warm: bool = True, settle: bool = False
) -> dict[Any, list[float]]:
    """Seconds of each of ``repeats`` calls ``block(fn())`` per function, taking turns.

    Parameters
    ----------
    fns : dict
        Name to a function of no arguments.
    block : callable
        Waits until its argument is computed (``Harness.block``), so that asynchronous
        frameworks are timed to the end of the work.
    repeats : int
        Timed calls of each function.
    warm : bool
        Call each function once, untimed, before any timing (compilation, kernel loading).
        False where the caller has warmed them up.
    settle : bool
        Precede each timed call with an untimed call of the same function, so that none
        is timed in the wake of another's allocations: the pages a dense peer frees (1.5
        GB a call at n 4096, 8 heads) go back to the OS, and the next function faults its
        buffers in afresh (JAX's forward: 152 ms alone, 191 to 264 ms right after
        ``jax.nn``, 154 to 157 settled).

    Returns
    -------
    dict
        Name to the list of ``repeats`` durations in seconds, in call order.
    """
    for fn in fns.values() if warm else ():
        block(fn())
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if settle:
                block(fn())
            start = time.perf_counter()
            block(fn())
            times[name].append(time.perf_counter() - start)
    return times


def interleaved_medians(
    fns: dict, block: Callable, repeats: int, warm: bool = True, settle: bool = False
) -> dict[Any, float]:
    """Median seconds of each function's timed calls (:func:`timings`, same parameters).

    With one function this is the median of ``repeats`` calls after a warm-up.
    """
    return {
        name: statistics.median(t) for name, t in timings(fns, block, repeats, warm, settle).items()
    }


def gradients(backend, fn: Callable | None = None, **options) -> Callable:
    """The gradients of an attention call, as ``(q, k, v, d_out) -> (dq, dk, dv)``.

    Parameters
    ----------
    backend : Harness
        The harness of the framework the arrays belong to (``uniattn.backends.harness``).
    fn : callable, optional
        ``fn(q, k, v) -> out`` to differentiate; default ``uniattn.attention`` with
        ``options``. Where the backend has no autodiff only uniattn's attention has
        gradients, so ``fn`` must then be None or ``uniattn.attention``.
    **options
        Keyword arguments of ``uniattn.attention`` (``causal``, ``backward``...), for the
        default ``fn`` only.

    Returns
    -------
    callable
        ``(q, k, v, d_out) -> (dq, dk, dv)``: through the framework's autodiff where
        ``backend.has_autodiff`` (on torch ``Tensor.backward`` into fresh leaves, because a
        function that checkpoints with ``use_reentrant=True``, as memory-efficient-attention
        0.1.3 does, rejects the ``torch.autograd.grad`` of ``Harness.vjp``); otherwise
        through ``uniattn.vjp``, uniattn's own backward.
    """
    import uniattn

    if fn is not None and options:
        raise ValueError("options apply to uniattn.attention, the default fn, only")
    if not backend.has_autodiff:
        if fn not in (None, uniattn.attention):
            raise ValueError(f"{backend.name} has no autodiff: only uniattn.vjp has gradients")
        return lambda q, k, v, d_out: uniattn.vjp(q, k, v, **options)[1](d_out)
    call = functools.partial(uniattn.attention, **options) if fn is None else fn
    if backend.name == "torch":
        return functools.partial(_torch_gradients, call)
    return lambda q, k, v, d_out: backend.vjp(call, q, k, v)[1](d_out)


def _torch_gradients(fn: Callable, *args):
    """:func:`gradients` on torch: ``Tensor.backward`` into fresh leaves, which every
    function accepts (the inputs themselves are left as they were)."""
    *primals, d_out = args
    leaves = [x.detach().requires_grad_() for x in primals]
    fn(*leaves).backward(d_out)
    return tuple(x.grad for x in leaves)


def _status(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) * 1024


def timed_peak(backend, run: Callable, args: tuple) -> tuple[float, int | None]:
    """Seconds and peak extra bytes of one ``run(*args)``, compiled and warmed up before.

    The peak is the larger of two lower bounds: the growth of the resident set (``VmHWM``,
    reset first, over ``VmRSS`` before the call), which misses memory that a pooling
    allocator holds from an earlier call and reuses, and the framework allocator's own
    peak above what it held before (``Harness.reset_peak_memory``, where it keeps
    statistics), which misses what the framework takes outside that allocator. Arrays on
    an accelerator are measured by the allocator alone, and not at all (None) where it
    keeps no statistics.

    Parameters
    ----------
    backend : Harness
        The harness of the framework that ``run`` computes with.
    run : callable
        The call to measure, ready to run (``Harness.precompile``).
    args : tuple
        Its arguments; the first one's device decides between host and accelerator.

    Returns
    -------
    tuple
        ``(seconds, peak_bytes)``; ``peak_bytes`` is None where it is not measured.
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


def memory_in_subprocess(
    backend: str, n: int, task: str = "forward", device: str | None = None, timeout: float = 600
) -> dict | None:
    """Peak extra bytes of each implementation at length ``n`` (1 head, d 64, float32).

    Measured in a fresh process (:func:`in_fresh_process`, with the mmap threshold pinned)
    by :func:`timed_peak`.

    Parameters
    ----------
    backend : str
        The backend's name.
    n : int
        Sequence length.
    task : {"forward", "gradient", "decode"}
        "forward" measures ``{"uniattn", "plain"}``; "gradient" a forward and backward
        pass, ``{"custom", "autodiff", "plain"}`` (plain under the framework's autodiff;
        NumPy: ``{"custom"}`` through ``uniattn.vjp``); "decode" ``{"uniattn"}``, one
        eager decoding step from a cache of ``n`` keys, beside the cache's own bytes
        ``{"cache"}``.
    device : str, optional
        The framework's name of the device; None: its default device.
    timeout : float
        Seconds before the process is stopped.

    Returns
    -------
    dict or None
        Name to bytes; None where peak RSS cannot be measured (not Linux). Each value is
        None where the device's memory is not measured.

    Raises
    ------
    RuntimeError
        When the measurement fails (the process's stderr has been written to stderr).
    """
    if not Path("/proc/self/clear_refs").exists():
        return None
    spec = {"backend": backend, "n": n, "task": task, "device": device}
    lines = in_fresh_process(f"{__name__}:_peaks", spec, memory=True, timeout=timeout)
    for line in lines:
        if "peak_bytes" in line:
            return line["peak_bytes"]
    error = next((line["error"] for line in lines if "error" in line), "no result")
    raise RuntimeError(f"measuring {backend} {task} at n {n}: {error}")


def _peaks(backend, spec: dict) -> None:
    """The task of :func:`memory_in_subprocess`: emits ``peak_bytes``."""
    emit(peak_bytes=_peak_bytes(backend, spec["n"], spec["task"]))


def _peak_bytes(backend, n: int, task: str) -> dict:
    import numpy as np

    import uniattn
    from uniattn._plain import plain_attention

    rng = np.random.default_rng(0)
    if task == "decode":
        return _decode(backend, rng, n)
    q, k, v, d_out = (
        backend.asarray(rng.standard_normal((1, n, 1, 64)), "float32") for _ in range(4)
    )
    # uniattn's algorithm: the default would be a framework's fused kernel where one applies.
    chunked = {"implementation": "chunked"}
    if task == "forward":
        runs = {
            "uniattn": functools.partial(uniattn.attention, **chunked),
            "plain": lambda *a: plain_attention(backend, *a),
        }
    elif not backend.has_autodiff:
        runs = {"custom": gradients(backend, **chunked)}
    else:
        runs = {
            "custom": gradients(backend, backward="custom", **chunked),
            "autodiff": gradients(backend, backward="autodiff", **chunked),
            "plain": gradients(backend, lambda *a: plain_attention(backend, *a)),
        }
    args = (q, k, v) if task == "forward" else (q, k, v, d_out)
    return {
        impl: timed_peak(backend, backend.precompile(run, *args), args)[1]
        for impl, run in runs.items()
    }


def _decode(backend, rng, n: int) -> dict:
    """Peak extra bytes of one decoding step (``"uniattn"``) and the bytes of its cache, k
    and v (``"cache"``): 32 query heads on 8 key/value heads, d 64, float32, layout BHTD,
    ``n`` keys. Called eagerly (after a warm-up), as a decoding loop calls it, so that what
    runs outside a staged function counts too."""
    import uniattn

    q = backend.asarray(rng.standard_normal((1, 32, 1, 64)), "float32")
    k, v = (backend.asarray(rng.standard_normal((1, 8, n, 64)), "float32") for _ in "kv")

    def step(q, k, v):
        return uniattn.attention(q, k, v, layout="BHTD", implementation="chunked")

    backend.block(step(q, k, v))
    cache = 2 * math.prod(k.shape) * 4
    return {"uniattn": timed_peak(backend, step, (q, k, v))[1], "cache": cache}


def in_fresh_process(
    task: str,
    spec: dict,
    *,
    memory: bool = False,
    on_line: Callable[[dict], None] | None = None,
    timeout: float = 3600,
) -> list[dict]:
    """Run a task function in a new Python process and return the JSON lines it emits.

    Peak memory must start from a clean process, and Keras picks its backend at import,
    so measurements of either kind run here, one process per backend.

    Parameters
    ----------
    task : str
        ``"module:function"``; the process calls ``function(backend, spec)`` with
        ``backend`` the harness of ``spec["backend"]``, placed on ``spec["device"]`` where
        that is given (and then, on an accelerator, first emits ``device``, its model).
        The function reports with :func:`emit`; an exception it raises comes back as an
        ``error`` line.
    spec : dict
        JSON-serialisable settings; ``"backend"`` names the backend (and Keras's backend).
    memory : bool
        Pin glibc's mmap threshold (``MALLOC_MMAP_THRESHOLD_=65536``) so freed buffers go
        back to the OS and the resident size is honest. This costs page faults on every
        large allocation, so times measured beside it are not comparable with others.
    on_line : callable, optional
        Called with each line as it arrives (progress).
    timeout : float
        Seconds before the process is killed.

    Returns
    -------
    list of dict
        The emitted lines in order. A process that times out or exits with an error
        without saying why ends the list with ``{"error": ...}``. The process's stderr
        (framework log lines, a traceback) is written to this process's stderr only when
        the process fails.
    """
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": spec["backend"]}
    if memory:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    command = [sys.executable, "-m", __name__, task, json.dumps(spec)]
    lines, killed = [], threading.Event()
    with (
        tempfile.TemporaryFile() as stderr,
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env
        ) as process,
    ):

        def kill() -> None:
            killed.set()
            process.kill()

        watchdog = threading.Timer(timeout, kill)
        watchdog.start()
        try:
            for text in process.stdout:
                if text.startswith("{"):
                    lines.append(json.loads(text))
                    if on_line is not None:
                        on_line(lines[-1])
        finally:
            watchdog.cancel()
        returncode = process.wait()
        if killed.is_set():
            lines.append({"error": f"timed out after {timeout:.0f} s"})
        elif returncode != 0 and not any("error" in line for line in lines):
            lines.append({"error": f"the worker exited with {returncode}"})
        if returncode != 0:
            stderr.seek(0)
            sys.stderr.write(stderr.read().decode(errors="replace"))
            sys.stderr.flush()
    return lines


def emit(**fields) -> None:
    """Write one JSON line to stdout, at once: how a task of :func:`in_fresh_process`
    reports."""
    print(json.dumps(fields), flush=True)


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Capture file descriptor 2 for the duration; show what it caught only on an exception.

    Frameworks log from C++ straight to the descriptor (TensorFlow's oneDNN, CUDA stub and
    ``cuInit`` lines, absl's warning that precedes them), which neither
    ``TF_CPP_MIN_LOG_LEVEL`` nor Python's ``sys.stderr`` controls. What Python writes to
    ``sys.stderr`` meanwhile is captured too, where that is the same descriptor.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    failed = True
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
            failed = False
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if failed:
                sink.seek(0)
                sys.stderr.write(sink.read().decode(errors="replace"))
                sys.stderr.flush()


def harness(name: str, device: str | None = None):
    """``uniattn.backends.harness(name)``, placed on ``device`` (``Harness.on``) where given,
    with the framework imported and its first array made under :func:`quiet_stderr`."""
    from uniattn import backends

    with quiet_stderr():
        found = backends.harness(name)
        found = found if device is None else found.on(device)
        found.array_platform()  # the device starts (and logs) here, not in a measurement
    return found


def device_name(backend) -> str:
    """The model of ``backend``'s array device, e.g. "NVIDIA H100 80GB HBM3"."""
    device = backend.array_device
    if backend.name == "torch" and device.type == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    return str(getattr(device, "device_kind", device))


def _run_task(task: str, spec: dict) -> None:
    """The new process's side of :func:`in_fresh_process`."""
    module, _, function = task.partition(":")
    try:
        run = getattr(importlib.import_module(module), function)
        backend = harness(spec["backend"], spec.get("device"))
        if spec.get("device") and backend.array_platform() != "cpu":
            emit(device=device_name(backend))
        run(backend, spec)
    except Exception as e:  # report, do not hide: the parent prints it in its table
        emit(error=f"{type(e).__name__}: {str(e)[:300]}")
        raise


def main(argv: list[str]) -> None:
    """``python -m uniattn._measure``: a task of :func:`in_fresh_process` (``MODULE:FUNCTION
    SPEC_JSON``), or ``BACKEND N TASK [DEVICE]`` for :func:`memory_in_subprocess`'s
    figures as one JSON line."""
    if ":" in argv[0]:
        _run_task(argv[0], json.loads(argv[1]))
        return
    name, n, task, *device = argv
    backend = harness(name, device[0] if device else None)
    print(json.dumps(_peak_bytes(backend, int(n), task)))


if __name__ == "__main__":
    # Run the imported module's main, so that task functions which import this module
    # share its one copy.
    from uniattn._measure import main as _main

    _main(sys.argv[1:])
