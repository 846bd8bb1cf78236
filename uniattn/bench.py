"""Benchmarks: ``python -m uniattn.bench SUBCOMMAND [--backend NAME ...] [--quick] [--out DIR]``.

Every figure is measured side by side in one run: times are medians of interleaved
repetitions in one process, memory is peak RSS above the inputs in a fresh process per
backend (see ``uniattn._measure``). Results go to stdout as a markdown table and, with
``--out``, to ``DIR/<subcommand>.md`` and ``DIR/<subcommand>.json``.

Subcommands
-----------
backward
    Forward+backward time of ``backward="custom"`` against ``backward="autodiff"``
    (float32, batch 1, 8 heads, d 64, n 4096; ``--quick``: n 1024), and peak extra
    memory of a forward+backward pass at n 16384, 1 head, d 64 against plain
    ``softmax(q kᵀ) v`` under the framework's autodiff (``--quick``: n 4096).
masks
    What skipping fully masked chunks saves (float32, batch 1, 4 heads, d 64, medians of 5
    interleaved repetitions): causal against full attention at n 8192, window (256, 0)
    against full at n 16384, forward and forward+backward (``backward="custom"``); and
    decoding one query against a 32768-long cache (32 heads on 8 kv heads, d 128)
    against the framework's plain attention. ``--quick``: n 2048 / 4096 / 8192.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import uniattn
from uniattn import backends
from uniattn._measure import memory_in_subprocess

MiB = 2**20


def interleaved_medians(fns: dict, block, repeats: int) -> dict:
    """Median seconds of each ``block(fn())``, the functions taking turns (after a warm-up)."""
    for fn in fns.values():
        block(fn())
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            block(fn())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _inputs(backend, n, heads, d=64, count=4, seed=0):
    rng = np.random.default_rng(seed)
    return [backend.asarray(rng.standard_normal((1, n, heads, d)), "float32") for _ in range(count)]


def backward_speed(backend, n: int, repeats: int) -> dict:
    """Median seconds of a forward+backward pass through the framework's autodiff, per mode."""
    q, k, v, d_out = _inputs(backend, n, heads=8)

    def step(mode):
        def attention(*a):
            return uniattn.attention(*a, backward=mode)

        return lambda: backend.vjp(attention, q, k, v)[1](d_out)

    return interleaved_medians({m: step(m) for m in ("custom", "autodiff")}, backend.block, repeats)


def run_backward(names, quick: bool) -> tuple[str, dict]:
    n_speed, n_memory, repeats = (1024, 4096, 3) if quick else (4096, 16384, 5)
    rows, raw = [], {"n_speed": n_speed, "n_memory": n_memory, "backends": {}}
    for name in names:
        backend = backends.load(name)
        if not backend.has_autodiff:
            continue  # the comparison is between two ways of using a framework's autodiff
        speed = backward_speed(backend, n_speed, repeats)
        memory = memory_in_subprocess(name, n_memory, "gradient")
        raw["backends"][name] = {"seconds": speed, "peak_bytes": memory}
        rows.append(
            f"| {name} | {speed['custom'] * 1e3:.0f} | {speed['autodiff'] * 1e3:.0f} "
            f"| {speed['autodiff'] / speed['custom']:.2f}x "
            f"| {memory['custom'] / MiB:.1f} | {memory['autodiff'] / MiB:.1f} "
            f"| {memory['plain'] / MiB:.0f} | {memory['plain'] / max(memory['custom'], 1):.0f}x "
            f"| {memory['plain'] / max(memory['autodiff'], 1):.0f}x |"
        )
    table = "\n".join(
        [
            f"forward+backward, float32: time at n={n_speed}, batch 1, 8 heads, d 64 (median of "
            f"{repeats}, interleaved); peak memory above inputs at n={n_memory}, 1 head, d 64",
            "",
            "| backend | custom ms | autodiff ms | custom speed-up | custom MiB | autodiff MiB "
            "| plain MiB | plain / custom | plain / autodiff |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    return table, raw


def _fwd_bwd(backend, q, k, v, d_out, **kwargs):
    """A forward+backward pass with uniattn's backward (``uniattn.vjp`` on NumPy)."""
    if not backend.has_autodiff:
        return lambda: uniattn.vjp(q, k, v, **kwargs)[1](d_out)
    return lambda: backend.vjp(lambda *a: uniattn.attention(*a, **kwargs), q, k, v)[1](d_out)


def run_masks(names, quick: bool) -> tuple[str, dict]:
    n_causal, n_window, n_cache = (2048, 4096, 8192) if quick else (8192, 16384, 32768)
    settings = [
        ("causal", n_causal, {"causal": True}),
        ("window (256, 0)", n_window, {"window": (256, 0)}),
    ]
    rows, raw = [], {"backends": {}}
    for name in names:
        backend = backends.load(name)
        raw["backends"][name] = entry = {}
        for label, n, kwargs in settings:
            t = _masked_and_full_times(backend, n, kwargs)
            entry[label] = {"n": n, "seconds": t}
            rows.append(
                f"| {name} | {label} | {n} | {t['masked'] * 1e3:.0f} | {t['full'] * 1e3:.0f} "
                f"| {t['full'] / t['masked']:.2f}x | {t['masked_grad'] * 1e3:.0f} "
                f"| {t['full_grad'] * 1e3:.0f} | {t['full_grad'] / t['masked_grad']:.2f}x |"
            )
        entry["decode"] = decode = _decode_times(backend, n_cache)
        rows.append(
            f"| {name} | decode, 1 query, 32 heads / 8 kv heads, d 128 | {n_cache} "
            f"| {decode['uniattn'] * 1e3:.1f} | plain {decode['plain'] * 1e3:.1f} "
            f"| {decode['plain'] / decode['uniattn']:.2f}x | | | |"
        )
    table = "\n".join(
        [
            "skipping fully masked chunks: float32, batch 1, 4 heads, d 64, median of 5 "
            "interleaved repetitions; fwd+bwd with backward='custom'",
            "",
            "| backend | mask | n | masked ms | full ms | speed-up | masked fwd+bwd ms "
            "| full fwd+bwd ms | speed-up |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    return table, raw


def _masked_and_full_times(backend, n: int, kwargs: dict) -> dict:
    """Forward and forward+backward medians with the mask ``kwargs`` and without."""
    q, k, v, d_out = _inputs(backend, n, heads=4)
    fns = {
        "masked": lambda: uniattn.attention(q, k, v, **kwargs),
        "full": lambda: uniattn.attention(q, k, v),
        "masked_grad": _fwd_bwd(backend, q, k, v, d_out, **kwargs),
        "full_grad": _fwd_bwd(backend, q, k, v, d_out),
    }
    return interleaved_medians(fns, backend.block, repeats=5)


def _decode_times(backend, n_cache: int) -> dict:
    """One query row, causal, against a cache: uniattn against plain attention."""
    from uniattn._plain import plain_attention

    rng = np.random.default_rng(0)
    q = backend.asarray(rng.standard_normal((1, 1, 32, 128)), "float32")
    k, v = (backend.asarray(rng.standard_normal((1, n_cache, 8, 128)), "float32") for _ in "kv")
    xp = backend.namespace()
    expanded = (xp.reshape(x, (1, n_cache, 8, 1, 128)) for x in (k, v))
    k_rep, v_rep = (xp.reshape(xp.concat([x] * 4, axis=3), (1, n_cache, 32, 128)) for x in expanded)
    fns = {
        "uniattn": lambda: uniattn.attention(q, k, v, causal=True),
        "plain": lambda: plain_attention(backend, q, k_rep, v_rep),
    }
    return interleaved_medians(fns, backend.block, repeats=5)


SUBCOMMANDS = {"backward": run_backward, "masks": run_masks}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m uniattn.bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument("subcommand", choices=sorted(SUBCOMMANDS))
    parser.add_argument(
        "--backend",
        action="append",
        choices=list(backends.REGISTRY),
        help="backend to measure (repeatable; default: every installed one)",
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repetitions")
    parser.add_argument("--out", type=Path, help="directory for the markdown and JSON results")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    table, raw = SUBCOMMANDS[args.subcommand](args.backend or backends.installed(), args.quick)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.subcommand}.md").write_text(table + "\n")
        (args.out / f"{args.subcommand}.json").write_text(json.dumps(raw, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
