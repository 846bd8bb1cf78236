"""PNG plots of the ``memory`` and ``speed`` reports (matplotlib, from the ``bench`` extra)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from uniattn.bench._common import MiB, Report


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def plot(report: Report, out: Path) -> list[Path]:
    """The plots of ``report`` under ``out`` (none for reports without one)."""
    draw = {"memory": _memory, "speed": _speed}.get(report.name)
    if draw is None or not report.raw.get("backends"):
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = draw(plt, report.raw)
    path = out / f"{report.name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return [path]


def _memory(plt, raw):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    # One colour per backend in both panels; uniattn solid, plain dashed.
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colours = {name: cycle[i % len(cycle)] for i, name in enumerate(raw["backends"])}
    for ax, task in zip(axes, ("forward", "gradient"), strict=True):
        for name, by_task in raw["backends"].items():
            lines = [x for x in by_task.get(task, []) if "peak_bytes" in x]
            for impl, style in (("uniattn", "-o"), ("plain", "--x")):
                pts = sorted((x["n"], x["peak_bytes"] / MiB) for x in lines if x["impl"] == impl)
                if pts:
                    label = f"{name} {impl}"
                    ax.plot(*zip(*pts, strict=True), style, color=colours[name], label=label)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="sequence length n",
            title="inference" if task == "forward" else "differentiation",
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    axes[0].set_ylabel("peak memory above inputs (MiB)")
    return fig


def _speed(plt, raw):
    names = list(raw["backends"])
    fig, axes = plt.subplots(2, len(names), figsize=(4.2 * len(names), 7), squeeze=False)
    for col, name in enumerate(names):
        for row, mode in enumerate(("forward", "gradient")):
            ax = axes[row][col]
            ax.set_title(f"{name}, {'fwd' if mode == 'forward' else 'fwd+bwd'}")
            series = {}
            for line in raw["backends"][name]:
                if line.get("mode") == mode and "seconds" in line:
                    for impl, t in line["seconds"].items():
                        series.setdefault(impl, []).append((line["n"], t * 1e3))
            if not series:  # no axes to read: an empty log scale would show 1 to 10
                ax.set_axis_off()
                ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
                continue
            for impl, pts in series.items():
                ax.plot(
                    *zip(*sorted(pts), strict=True),
                    "-o" if impl == "uniattn" else "--.",
                    label=impl,
                )
            ax.set(xscale="log", yscale="log", xlabel="n")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        axes[0][col].set_ylabel("ms")
    fig.tight_layout()
    return fig
