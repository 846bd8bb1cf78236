"""``speed``: uniattn against native attention and peers, forward and forward+backward.

n = 1024 … 16384 (``--quick``: 1024, 2048), 8 heads, d 64, float32 (``--dtype``), batch 1,
layout BTHD (``--layout``), without a mask (``--causal``: causal), on each framework's
default device (``--device``). "uniattn" is the default implementation, a framework's fused
kernel where one computes the call; "uniattn chunked", listed where the two differ, is
uniattn's algorithm. Every implementation runs in one process per backend, in turns
(medians of interleaved repetitions, each timed call right after an untimed one of the same
implementation, so that none is timed in the wake of a dense peer's freed gigabytes), each
as a user of that framework would call it: JAX jitted, the others eager. GFLOP/s counts
attention's model FLOPs (see ``attention_flops``; half of them with ``--causal``); "%
matmul" is that rate over the framework's own matmul rate in that dtype, measured in the
same process.
"""

from __future__ import annotations

from uniattn._measure import emit, gradients, in_fresh_process, interleaved_medians
from uniattn.bench._common import (
    Progress,
    Report,
    attention_flops,
    inputs,
    matmul_rate,
    ms,
    too_big,
)

HEADS, D = 8, 64
MODES = ("forward", "gradient")


def lengths(quick: bool, full: bool = False) -> list[int]:
    return [1024, 2048] if quick else [1024, 2048, 4096, 8192, 16384]


def run(
    names,
    quick: bool = False,
    full: bool = False,
    ns: list[int] | None = None,
    device: str | None = None,
    dtype: str = "float32",
    causal: bool = False,
    layout: str = "BTHD",
) -> Report:
    ns = ns or lengths(quick, full)
    where = f" on {device}" if device else ""
    options = f", layout {layout}{', causal' if causal else ''}"
    report = Report(
        "speed",
        f"Time of attention, batch 1, {HEADS} heads, d {D}, {dtype}{options}{where}; ratio = "
        "time / uniattn's time (below 1: faster than uniattn); medians of interleaved "
        "repetitions. uniattn: the default implementation; uniattn chunked: its algorithm, "
        "where the default is a fused kernel.",
        ["backend", "mode", "n", "implementation", "ms", "ratio", "GFLOP/s", "% matmul"],
        raw={
            "lengths": ns,
            "heads": HEADS,
            "d": D,
            "dtype": dtype,
            "device": device,
            "causal": causal,
            "layout": layout,
        },
    )
    report.raw["backends"] = {}
    progress = Progress(len(names) * len(ns) * len(MODES), "speed")
    for name in names:
        spec = {
            "backend": name,
            "ns": ns,
            "heads": HEADS,
            "d": D,
            "repeats": 3 if quick else 5,
            "modes": list(MODES),
            "device": device,
            "dtype": dtype,
            "causal": causal,
            "layout": layout,
        }
        progress.step(f"{name} (starting)")

        def seen(line, name=name):
            if "mode" in line and ("seconds" in line or "error" in line):
                progress.advance()
                progress.step(f"{name} n={line['n']} {line['mode']} done")

        lines = in_fresh_process(f"{__name__}:measure", spec, on_line=seen)
        report.add_device(lines)
        report.raw["backends"][name] = lines
        report.rows += _rows(name, lines, causal)
    progress.close()
    skipped = sorted(
        {
            (r["impl"], r["skipped"])
            for b in report.raw["backends"].values()
            for r in b
            if "skipped" in r and "n" not in r
        }
    )
    report.notes += [f"- {impl}: {why}" for impl, why in skipped]
    rates = {name: _matmul_rate(lines) for name, lines in report.raw["backends"].items()}
    measured = [f"{name} {rate / 1e9:.0f}" for name, rate in rates.items() if rate]
    if measured:
        report.notes.append(
            f"- {dtype} matmul rate (GFLOP/s, best of 10 products before and 10 after the "
            f"timings): {', '.join(measured)}"
        )
    return report


def measure(backend, spec: dict) -> None:
    """The fresh process's side: every implementation at each n, forward and
    forward+backward, interleaved; the matmul rate before and after."""
    from uniattn.bench.peers import implementations

    dtype = spec.get("dtype", "float32")
    # Measured before and after the timings (the report takes the faster): on a shared
    # host one backend's rate had read 22% low at the start of its process.
    emit(matmul_flops_per_s=matmul_rate(backend, dtype=dtype))
    platform = backend.array_platform()
    causal, layout = spec.get("causal", False), spec.get("layout", "BTHD")
    found = implementations(backend, platform, dtype, causal=causal, layout=layout)
    for name, fn in found.items():
        if isinstance(fn, str):
            emit(impl=name, skipped=fn)
    runnable = {name: fn for name, fn in found.items() if not isinstance(fn, str)}
    for n in spec["ns"]:
        q, k, v, d_out = inputs(
            backend, n, heads=spec["heads"], d=spec["d"], dtype=dtype, layout=layout
        )
        for mode in spec["modes"]:
            gradient = mode == "gradient"
            if gradient and not backend.has_autodiff:
                continue
            fns = {}
            for name, fn in runnable.items():
                dense = name in _DENSE and platform == "cpu"  # a GPU's limit: the warm-up's
                reason = too_big(n, spec["heads"], gradient) if dense else None
                if reason:
                    emit(n=n, mode=mode, impl=name, skipped=reason)
                    continue
                staged = backend.stage(gradients(backend, fn) if gradient else fn)
                args = (q, k, v, d_out) if gradient else (q, k, v)
                try:  # the warm-up: a peer that fails here is reported and left out
                    backend.block(staged(*args))
                except Exception as e:
                    emit(n=n, mode=mode, impl=name, skipped=f"{type(e).__name__}: {e}"[:160])
                    continue
                fns[name] = lambda staged=staged, args=args: staged(*args)
            seconds = interleaved_medians(
                fns, backend.block, spec["repeats"], warm=False, settle=True
            )
            emit(n=n, mode=mode, seconds=seconds)
    emit(matmul_flops_per_s=matmul_rate(backend, dtype=dtype))


# Peers that hold the n x n scores (skipped where those would not fit).
_DENSE = ("plain", "keras", "jax.nn.dot_product_attention")


def _matmul_rate(lines) -> float | None:
    """The fastest of the worker's matmul-rate measurements (before and after its timings)."""
    rates = [x["matmul_flops_per_s"] for x in lines if "matmul_flops_per_s" in x]
    return max(rates, default=None)


def _rows(name, lines, causal=False) -> list[list[str]]:
    rate = _matmul_rate(lines)
    rows = []
    for line in lines:
        if "error" in line:
            where = f"n={line.get('n', '?')} {line.get('mode', '')}"
            rows.append([name, where, "", "error", line["error"], "", "", ""])
        if "seconds" not in line:
            continue
        n, mode, seconds = line["n"], line["mode"], line["seconds"]
        flops = attention_flops(n, HEADS, D, gradient=mode == "gradient")
        if causal:  # half the score matrix
            flops /= 2
        own = seconds.get("uniattn")
        for impl, t in seconds.items():
            rate_here = flops / t
            rows.append(
                [
                    name,
                    "fwd" if mode == "forward" else "fwd+bwd",
                    str(n),
                    impl,
                    ms(t),
                    "1" if impl == "uniattn" else f"{t / own:.2f}" if own else "—",
                    f"{rate_here / 1e9:.1f}",
                    f"{100 * rate_here / rate:.0f}%" if rate else "—",
                ]
            )
    for line in lines:
        if "skipped" in line and "n" in line:
            mode = "fwd" if line["mode"] == "forward" else "fwd+bwd"
            rows.append(
                [name, mode, str(line["n"]), line["impl"], "not run", line["skipped"], "", ""]
            )
    return rows
