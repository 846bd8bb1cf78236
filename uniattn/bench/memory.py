"""``memory``: the paper's Tables 2 (inference) and 3 (differentiation) on this machine.

1 head, d 64, float32, n = 2^8 … 2^16 (2^18 with ``--full``; ``--quick``: 2^8 … 2^12).
Overhead is peak RSS above the inputs, in a fresh process per backend and task, measured
the same way for uniattn and plain attention (see :mod:`uniattn._measure`); on an
accelerator (``--device``), the peak of the framework's allocator where it keeps one
(torch's CUDA allocator does; JAX's cannot be reset, so its rows there are empty).
"""

from __future__ import annotations

import functools

from uniattn._measure import emit, gradients, in_fresh_process, interleaved_medians, timed_peak
from uniattn.bench._common import Progress, Report, inputs, mib, ms, ratio, too_big

TASKS = {"forward": "Table 2, inference", "gradient": "Table 3, differentiation"}


def lengths(quick: bool, full: bool) -> list[int]:
    top = 12 if quick else 18 if full else 16
    return [2**e for e in range(8, top + 1)]


def io_bytes(n: int, gradient: bool, d: int = 64) -> int:
    """q, k, v and the output (and d_out, dq, dk, dv when differentiating), float32."""
    return (8 if gradient else 4) * n * d * 4


def run(
    names,
    quick: bool = False,
    full: bool = False,
    ns: list[int] | None = None,
    device: str | None = None,
) -> Report:
    ns = ns or lengths(quick, full)
    report = Report(
        "memory",
        "Peak memory above the inputs and time, 1 head, d 64, float32: uniattn against the "
        "framework's plain softmax(q kᵀ) v (Tables 2 and 3 of Rabe & Staats). Relative speed "
        "is plain time / uniattn time.",
        [
            "backend",
            "task",
            "n",
            "inputs + outputs MiB",
            "plain overhead MiB",
            "uniattn overhead MiB",
            "less memory",
            "uniattn ms",
            "plain ms",
            "relative speed",
        ],
        raw={"lengths": ns, "backends": {}},
    )
    progress = Progress(len(names) * len(TASKS) * len(ns) * 2, "memory")
    for name in names:
        report.raw["backends"][name] = by_task = {}
        for task in TASKS:
            spec = {"backend": name, "task": task, "ns": ns, "repeats": 3, "device": device}
            progress.step(f"{name} {task}")

            def seen(line, name=name, task=task):
                progress.advance()
                if "n" in line:
                    progress.step(f"{name} {task}: n={line['n']} {line.get('impl', '')} done")

            lines = in_fresh_process(f"{__name__}:measure", spec, memory=True, on_line=seen)
            report.add_device(lines)
            by_task[task] = lines
            report.rows += _rows(name, task, ns, lines)
    progress.close()
    if any("not run¹" in row for row in report.rows):
        report.notes.append(
            "¹ not run: plain attention's n x n blocks would not fit in the free memory "
            "(the JSON says how much they need)."
        )
    return report


def measure(backend, spec: dict) -> None:
    """The fresh process's side: per n, peak extra memory and time of uniattn and plain
    attention, one line each (or why it was skipped)."""
    import uniattn
    from uniattn._plain import plain_attention

    gradient = spec["task"] == "gradient"
    for n in spec["ns"]:
        q, k, v, d_out = inputs(backend, n, heads=1)
        on_host = backend.platform(q) == "cpu"
        fns = {
            "uniattn": functools.partial(uniattn.attention, implementation="chunked"),
            "plain": lambda *a: plain_attention(backend, *a),
        }
        for impl, fn in fns.items():
            reason = too_big(n, 1, gradient) if impl == "plain" and on_host else None
            if impl == "plain" and gradient and not backend.has_autodiff:
                reason = f"{backend.name} has no autodiff"
            if reason:
                emit(n=n, impl=impl, skipped=reason)
                continue
            args = (q, k, v, d_out) if gradient else (q, k, v)
            run = fn
            if gradient:  # uniattn's own backward (NumPy: through uniattn.vjp)
                chunked = impl == "uniattn"
                run = (
                    gradients(backend, implementation="chunked")
                    if chunked
                    else gradients(backend, fn)
                )
            try:  # an accelerator's memory is not checked ahead: running out is reported
                if n == spec["ns"][0] or backend.compiles_per_shape:
                    run = backend.precompile(run, *args)  # later lengths reuse the warm-up
                seconds, peak = timed_peak(backend, run, args)
            except Exception as e:
                if on_host:
                    raise
                emit(n=n, impl=impl, skipped=f"{type(e).__name__}: {e}"[:160])
                continue
            if seconds < 2:  # cheap enough for a median
                repeat = {impl: lambda run=run, args=args: run(*args)}
                seconds = interleaved_medians(repeat, backend.block, spec["repeats"])[impl]
            emit(n=n, impl=impl, peak_bytes=peak, seconds=seconds)


def _rows(name, task, ns, lines) -> list[list[str]]:
    by_n = {}
    for line in lines:
        if "n" in line:
            by_n.setdefault(line["n"], {})[line["impl"]] = line
    errors = [line["error"] for line in lines if "error" in line]
    rows = []
    for n in ns:
        got = by_n.get(n, {})
        uni, plain = got.get("uniattn", {}), got.get("plain", {})
        plain_mem = mib(plain.get("peak_bytes"))
        if "no autodiff" in plain.get("skipped", ""):
            plain_mem = "no autodiff"
        elif "skipped" in plain:
            plain_mem = "not run¹"
        rows.append(
            [
                name,
                task,
                str(n),
                mib(io_bytes(n, task == "gradient")),
                plain_mem,
                mib(uni.get("peak_bytes")),
                ratio(plain.get("peak_bytes"), uni.get("peak_bytes")),
                ms(uni.get("seconds")),
                ms(plain.get("seconds")),
                ratio(plain.get("seconds"), uni.get("seconds")),
            ]
        )
    if errors:
        rows.append([name, task, "error", errors[0], *[""] * 6])
    return rows
