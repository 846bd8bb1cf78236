"""``scale``: one forward+backward pass at n = 131072 (``--quick``: 16384), 1 head, d 64,
float32, on every backend: its time and peak memory above the inputs, in a fresh process.
Plain attention would need 64 GiB for the scores alone at this length. The time includes
any compilation (one cold call: a warm-up would double a minutes-long run)."""

from __future__ import annotations

from uniattn._measure import emit, gradients, in_fresh_process, timed_peak
from uniattn.bench._common import Progress, Report, inputs, mib, ms, plain_bytes


def run(names, quick: bool = False, full: bool = False) -> Report:
    n = 16384 if quick else 131072
    report = Report(
        "scale",
        f"One forward+backward pass at n {n}, 1 head, d 64, float32 (NumPy: uniattn.vjp); "
        f"plain attention would hold ~{plain_bytes(n, 1, True) / 2**30:.0f} GiB.",
        ["backend", "n", "seconds", "peak MiB above inputs"],
        raw={"n": n, "backends": {}},
    )
    progress = Progress(len(names), "scale")
    for name in names:
        progress.step(f"{name} n={n}")
        # One call in a fresh process: nothing freed earlier can hide its peak, and a
        # pinned mmap threshold's page faults would multiply its minutes-long run.
        lines = in_fresh_process(f"{__name__}:measure", {"backend": name, "n": n})
        progress.advance()
        report.raw["backends"][name] = lines
        done = next((x for x in lines if "seconds" in x), None)
        if done is None:
            error = next((x["error"] for x in lines if "error" in x), "no result")
            report.rows.append([name, str(n), "error", error])
        else:
            report.rows.append(
                [name, str(n), f"{float(ms(done['seconds'])) / 1e3:.1f}", mib(done["peak_bytes"])]
            )
    progress.close()
    return report


def measure(backend, spec: dict) -> None:
    """The fresh process's side: one forward+backward pass at ``spec["n"]``, its time and
    peak extra memory."""
    n = spec["n"]
    q, k, v, d_out = inputs(backend, n, heads=1)
    seconds, peak = timed_peak(
        backend, gradients(backend, implementation="chunked"), (q, k, v, d_out)
    )
    emit(n=n, seconds=seconds, peak_bytes=peak)
