"""``backward``: uniattn's custom backward against differentiating its forward.

Forward+backward time of ``backward="custom"`` against ``backward="autodiff"`` (float32,
batch 1, 8 heads, d 64, n 4096; ``--quick``: n 1024), and peak extra memory of a
forward+backward pass at n 16384, 1 head, d 64 against plain ``softmax(q kᵀ) v`` under
the framework's autodiff (``--quick``: n 4096).
"""

from __future__ import annotations

from uniattn._measure import gradients, harness, interleaved_medians, memory_in_subprocess
from uniattn.bench._common import MiB, Report, inputs


def backward_speed(backend, n: int, repeats: int) -> dict:
    """Median seconds of a forward+backward pass through the framework's autodiff, per mode."""
    q, k, v, d_out = inputs(backend, n, heads=8)

    def step(mode):
        run = gradients(backend, backward=mode, implementation="chunked")
        return lambda: run(q, k, v, d_out)

    return interleaved_medians({m: step(m) for m in ("custom", "autodiff")}, backend.block, repeats)


def run(names, quick: bool = False, full: bool = False) -> Report:
    n_speed, n_memory, repeats = (1024, 4096, 3) if quick else (4096, 16384, 5)
    report = Report(
        "backward",
        f"forward+backward, float32: time at n={n_speed}, batch 1, 8 heads, d 64 (median of "
        f"{repeats}, interleaved); peak memory above inputs at n={n_memory}, 1 head, d 64",
        [
            "backend",
            "custom ms",
            "autodiff ms",
            "custom speed-up",
            "custom MiB",
            "autodiff MiB",
            "plain MiB",
            "plain / custom",
            "plain / autodiff",
        ],
        raw={"n_speed": n_speed, "n_memory": n_memory, "backends": {}},
    )
    for name in names:
        backend = harness(name)
        if not backend.has_autodiff:
            continue  # the comparison is between two ways of using a framework's autodiff
        speed = backward_speed(backend, n_speed, repeats)
        memory = memory_in_subprocess(name, n_memory, "gradient")
        report.raw["backends"][name] = {"seconds": speed, "peak_bytes": memory}
        report.rows.append(
            [
                name,
                f"{speed['custom'] * 1e3:.0f}",
                f"{speed['autodiff'] * 1e3:.0f}",
                f"{speed['autodiff'] / speed['custom']:.2f}x",
                f"{memory['custom'] / MiB:.1f}",
                f"{memory['autodiff'] / MiB:.1f}",
                f"{memory['plain'] / MiB:.0f}",
                f"{memory['plain'] / max(memory['custom'], 1):.0f}x",
                f"{memory['plain'] / max(memory['autodiff'], 1):.0f}x",
            ]
        )
    return report
