"""``python -m uniattn``: the same inputs through every installed framework.

Prints one row per backend: its version; the error of the output and of the gradients
against the float64 reference; forward time beside the framework's plain
``softmax(q kᵀ) v``; and peak extra memory of both at one long sequence length. The
frameworks' own log lines (TensorFlow's C++ logging) are held back unless a backend fails.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

import uniattn
from uniattn import backends, reference
from uniattn._measure import (
    gradients,
    harness,
    interleaved_medians,
    memory_in_subprocess,
    quiet_stderr,
)
from uniattn._plain import plain_attention

CHECK = dict(batch=2, q_len=257, kv_len=383, heads=8, kv_heads=2, d=64)
SPEED = dict(n=2048, heads=8, d=64)


def _error(actual, expected, scale=None) -> float:
    scale = float(np.max(np.abs(expected))) if scale is None else scale
    return float(np.max(np.abs(np.asarray(actual, np.float64) - expected))) / scale


def check_row(backend) -> dict:
    c = CHECK
    rng = np.random.default_rng(0)
    shapes = [
        (c["batch"], c["q_len"], c["heads"], c["d"]),
        (c["batch"], c["kv_len"], c["kv_heads"], c["d"]),
        (c["batch"], c["kv_len"], c["kv_heads"], c["d"]),
        (c["batch"], c["q_len"], c["heads"], c["d"]),
    ]
    q, k, v, d_out = (backend.asarray(rng.standard_normal(s), "float32") for s in shapes)
    q64, k64, v64, d64 = (backend.to_numpy(x).astype(np.float64) for x in (q, k, v, d_out))
    row = {"backend": backend.name, "version": backend.version()}
    out = uniattn.attention(q, k, v, causal=True)
    row["out_err"] = _error(backend.to_numpy(out), reference.attention(q64, k64, v64, causal=True))
    # Through the framework's autodiff (the registered backward); NumPy: uniattn.vjp.
    grads = [backend.to_numpy(g) for g in gradients(backend, causal=True)(q, k, v, d_out)]
    ref = reference.vjp(q64, k64, v64, d64, causal=True)
    expected = [ref.dq, ref.dk, ref.dv]
    scale = max(float(np.max(np.abs(e))) for e in expected)
    row["grad_err"] = max(_error(g, e, scale) for g, e in zip(grads, expected, strict=True))
    return row


def speed_row(backend) -> dict:
    s = SPEED
    rng = np.random.default_rng(1)
    q, k, v = (
        backend.asarray(rng.standard_normal((1, s["n"], s["heads"], s["d"])), "float32")
        for _ in range(3)
    )
    # One function at a time, median of 3 after a warm-up each.
    fns = {
        # The algorithm itself (the default is torch's SDPA here: `bench speed` shows both).
        "uniattn_s": lambda: uniattn.attention(q, k, v, implementation="chunked"),
        "plain_s": lambda: plain_attention(backend, q, k, v),
    }
    return {
        key: interleaved_medians({key: fn}, backend.block, repeats=3)[key]
        for key, fn in fns.items()
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uniattn", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backend",
        action="append",
        choices=list(backends.REGISTRY),
        help="backend to run (repeatable; default: every installed one)",
    )
    parser.add_argument(
        "--memory-length",
        type=int,
        default=8192,
        help="sequence length of the memory comparison (default 8192)",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    names = args.backend or backends.installed()
    c, s, n = CHECK, SPEED, args.memory_length
    print(f"uniattn {uniattn.__version__}: the same inputs through {', '.join(names)}\n")
    print(
        f"  error: float32, batch {c['batch']}, q_len {c['q_len']}, kv_len {c['kv_len']}, "
        f"{c['heads']} heads on {c['kv_heads']} kv heads, d {c['d']}, causal; max|x - ref| / max|ref| "
        "against the float64 reference (gradients: dq, dk, dv, over the largest gradient)"
    )
    print(
        f"  time:  forward, float32, n {s['n']}, {s['heads']} heads, d {s['d']}, median of 3, "
        "beside the same framework's plain softmax(q kT) v"
    )
    print(
        f"  memory: forward, float32, n {n}, 1 head, d 64: peak RSS above the inputs (or a "
        "pooling allocator's own peak), fresh process per backend\n"
    )
    header = (
        f"{'backend':<11}{'version':<15}{'out err':>9}{'grad err':>10}{'time ms':>9}"
        f"{'plain ms':>10}{'memory MiB':>12}{'plain MiB':>11}{'less':>7}"
    )
    print(header)
    print("-" * len(header))
    for name in names:
        with quiet_stderr():  # the framework's log lines, shown only if this fails
            backend = harness(name)
            row = {**check_row(backend), **speed_row(backend)}
        memory = memory_in_subprocess(name, n)
        grad = f"{row['grad_err']:.1e}"
        mem = (
            ("n/a", "n/a", "n/a")
            if memory is None
            else (
                f"{memory['uniattn'] / 2**20:.1f}",
                f"{memory['plain'] / 2**20:.0f}",
                f"{memory['plain'] / max(memory['uniattn'], 1):.0f}x",
            )
        )
        print(
            f"{name:<11}{row['version'][:14]:<15}{row['out_err']:>9.1e}{grad:>10}"
            f"{row['uniattn_s'] * 1e3:>9.1f}{row['plain_s'] * 1e3:>10.1f}"
            f"{mem[0]:>12}{mem[1]:>11}{mem[2]:>7}",
            flush=True,
        )
    if "numpy" in names:
        print("\nGradients: the framework's autodiff (backward='custom'); NumPy: uniattn.vjp.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
