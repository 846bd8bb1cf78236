"""Measurements that need a fresh process: ``python -m uniattn.bench._worker SPEC_JSON``.

Peak memory must start from a clean process, and Keras picks its backend at import; so
``memory``, ``speed`` and ``scale`` run here, one process per backend, and print one JSON
line per measurement as it completes (the parent shows progress from them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

from uniattn._measure import timed_peak


def run(spec: dict, on_line: Callable[[dict], None] | None = None, timeout: float = 3600):
    """Run ``spec`` in a fresh process; returns its JSON lines (``on_line`` sees each)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": spec["backend"]}
    if spec["task_kind"] in _MEMORY_TASKS:
        # Freed buffers go back to the OS, so RSS is honest; this costs page faults on
        # every large allocation, so timings beside it are not comparable with ``speed``.
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    command = [sys.executable, "-m", "uniattn.bench._worker", json.dumps(spec)]
    lines, deadline = [], time.monotonic() + timeout
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env) as process:
        for text in process.stdout:
            if text.startswith("{"):
                lines.append(json.loads(text))
                if on_line is not None:
                    on_line(lines[-1])
            if time.monotonic() > deadline:
                process.kill()
                lines.append({"error": f"timed out after {timeout:.0f} s"})
                break
        if process.wait() != 0 and not any("error" in line for line in lines):
            lines.append({"error": f"the worker exited with {process.returncode}"})
    return lines


# scale makes one call in a fresh process: nothing freed earlier can hide its peak, and
# the pinned threshold's page faults would multiply its minutes-long run.
_MEMORY_TASKS = ("memory",)


def _emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def _task_memory(backend, spec) -> None:
    """Tables 2/3: per n, peak extra memory and time of uniattn and plain attention."""
    import uniattn
    from uniattn._plain import plain_attention
    from uniattn.bench._common import inputs, interleaved_medians, too_big

    gradient = spec["task"] == "gradient"
    for n in spec["ns"]:
        q, k, v, d_out = inputs(backend, n, heads=1)
        on_host = backend.platform(q) == "cpu"
        fns = {"uniattn": uniattn.attention, "plain": lambda *a: plain_attention(backend, *a)}
        for impl, fn in fns.items():
            reason = too_big(n, 1, gradient) if impl == "plain" and on_host else None
            if impl == "plain" and gradient and not backend.has_autodiff:
                reason = f"{backend.name} has no autodiff"
            if reason:
                _emit(n=n, impl=impl, skipped=reason)
                continue
            args = (q, k, v, d_out) if gradient else (q, k, v)
            run = _gradient(backend, fn) if gradient else fn
            try:  # an accelerator's memory is not checked ahead: running out is reported
                if n == spec["ns"][0] or backend.compiles_per_shape:
                    run = backend.precompile(run, *args)  # later lengths reuse the warm-up
                seconds, peak = timed_peak(backend, run, args)
            except Exception as e:
                if on_host:
                    raise
                _emit(n=n, impl=impl, skipped=f"{type(e).__name__}: {e}"[:160])
                continue
            if seconds < 2:  # cheap enough for a median
                repeat = {impl: lambda run=run, args=args: run(*args)}
                seconds = interleaved_medians(repeat, backend.block, spec["repeats"])[impl]
            _emit(n=n, impl=impl, peak_bytes=peak, seconds=seconds)


def _task_speed(backend, spec) -> None:
    """Every implementation at each n, forward and forward+backward, interleaved."""
    from uniattn.bench._common import inputs, interleaved_medians, matmul_rate, too_big
    from uniattn.bench.peers import implementations

    dtype = spec.get("dtype", "float32")
    # Measured before and after the timings (the report takes the faster): on a shared
    # host one backend's rate had read 22% low at the start of its worker.
    _emit(matmul_flops_per_s=matmul_rate(backend, dtype=dtype))
    platform = backend.array_platform()
    found = implementations(backend, platform, dtype)
    for name, fn in found.items():
        if isinstance(fn, str):
            _emit(impl=name, skipped=fn)
    runnable = {name: fn for name, fn in found.items() if not isinstance(fn, str)}
    for n in spec["ns"]:
        q, k, v, d_out = inputs(backend, n, heads=spec["heads"], d=spec["d"], dtype=dtype)
        for mode in spec["modes"]:
            gradient = mode == "gradient"
            if gradient and not backend.has_autodiff:
                continue
            fns = {}
            for name, fn in runnable.items():
                dense = name in _DENSE and platform == "cpu"  # a GPU's limit: the warm-up's
                reason = too_big(n, spec["heads"], gradient) if dense else None
                if reason:
                    _emit(n=n, mode=mode, impl=name, skipped=reason)
                    continue
                staged = backend.stage(_gradient(backend, fn) if gradient else fn)
                args = (q, k, v, d_out) if gradient else (q, k, v)
                try:  # the warm-up: a peer that fails here is reported and left out
                    backend.block(staged(*args))
                except Exception as e:
                    _emit(n=n, mode=mode, impl=name, skipped=f"{type(e).__name__}: {e}"[:160])
                    continue
                fns[name] = lambda staged=staged, args=args: staged(*args)
            seconds = interleaved_medians(
                fns, backend.block, spec["repeats"], warm=False, settle=True
            )
            _emit(n=n, mode=mode, seconds=seconds)
    _emit(matmul_flops_per_s=matmul_rate(backend, dtype=dtype))


# Peers that hold the n x n scores (skipped where those would not fit).
_DENSE = ("plain", "keras", "jax.nn.dot_product_attention")


def _task_scale(backend, spec) -> None:
    """One forward+backward pass at a long length: time and peak extra memory."""
    import uniattn
    from uniattn.bench._common import inputs

    n = spec["n"]
    q, k, v, d_out = inputs(backend, n, heads=1)
    if backend.has_autodiff:
        run = _gradient(backend, uniattn.attention)
    else:
        run = lambda q, k, v, d: uniattn.vjp(q, k, v)[1](d)  # noqa: E731
    seconds, peak = timed_peak(backend, run, (q, k, v, d_out))
    _emit(n=n, seconds=seconds, peak_bytes=peak)


def _gradient(backend, fn):
    """``(q, k, v, d_out) -> (dq, dk, dv)`` by the framework's autodiff of ``fn``."""
    if not backend.has_autodiff:  # NumPy: uniattn's own backward
        import uniattn

        return lambda q, k, v, d: uniattn.vjp(q, k, v)[1](d)
    if backend.name == "torch":
        return lambda q, k, v, d: _torch_backward(fn, q, k, v, d)
    return lambda q, k, v, d: backend.vjp(fn, q, k, v)[1](d)


def _torch_backward(fn, *args):
    """``_gradient`` on torch: ``Tensor.backward`` into fresh leaves. A peer that
    checkpoints with ``use_reentrant=True`` (memory-efficient-attention 0.1.3) rejects
    ``torch.autograd.grad``, which ``Backend.vjp`` uses; every implementation is timed
    the same way, so their ratios stay comparable."""
    *primals, d_out = args
    leaves = [x.detach().requires_grad_() for x in primals]
    fn(*leaves).backward(d_out)
    return tuple(x.grad for x in leaves)


def _device_name(backend) -> str:
    """The model of ``backend``'s array device, e.g. "NVIDIA H100 80GB HBM3"."""
    device = backend.array_device
    if backend.name == "torch" and device.type == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    return str(getattr(device, "device_kind", device))


TASKS = {"memory": _task_memory, "speed": _task_speed, "scale": _task_scale}


def main() -> None:
    from uniattn import backends

    spec = json.loads(sys.argv[1])
    backend = backends.load(spec["backend"])
    if spec.get("device"):
        backend = backend.on(spec["device"])
        if backend.array_platform() != "cpu":
            _emit(device=_device_name(backend))
    try:
        TASKS[spec["task_kind"]](backend, spec)
    except Exception as e:  # report, do not hide: the parent prints it in the table
        _emit(error=f"{type(e).__name__}: {str(e)[:300]}")
        raise


if __name__ == "__main__":
    main()
