"""What every benchmark shares besides the measurement toolkit (:mod:`uniattn._measure`):
inputs, FLOP counts, the machine's matmul rate, a memory budget, a progress bar and the
report format."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from uniattn._measure import timings

MiB = 2**20
GiB = 2**30


def inputs(
    backend,
    n: int,
    heads: int,
    d: int = 64,
    count: int = 4,
    seed: int = 0,
    dtype="float32",
    layout="BTHD",
):
    """``count`` arrays ``[1, n, heads, d]`` (``[1, heads, n, d]`` for layout BHTD) of the
    backend (q, k, v, d_out), on its ``array_device``."""
    rng = np.random.default_rng(seed)
    shape = (1, n, heads, d) if layout == "BTHD" else (1, heads, n, d)
    return [backend.asarray(rng.standard_normal(shape), dtype) for _ in range(count)]


def attention_flops(n: int, heads: int, d: int, gradient: bool = False) -> float:
    """Model FLOPs of attention: ``4 n² d`` per head forward (two products), ``2.5x``
    that for the backward (FlashAttention's convention: five products, one recomputed)."""
    forward = 4.0 * n * n * d * heads
    return forward * 3.5 if gradient else forward


def matmul_rate(
    backend, size: int | None = None, repeats: int = 10, dtype: str = "float32"
) -> float:
    """The framework's matmul rate in FLOP/s in ``dtype``, on ``[size, size]`` operands
    (default: 2048 on a CPU, 8192 on an accelerator, which a smaller product leaves idle).

    The fastest of ``repeats`` products, not the median: this is the machine's capability,
    which a busy moment only hides (medians of 5 at the start of a worker read 25% low), and
    the fastest is the stricter yardstick for the percentages measured against it.
    """
    if size is None:
        size = 2048 if backend.array_platform() == "cpu" else 8192
    rng = np.random.default_rng(0)
    a, b = (backend.asarray(rng.standard_normal((size, size)), dtype) for _ in "ab")
    product = backend.stage(backend.namespace().matmul)
    seconds = timings({"matmul": lambda: product(a, b)}, backend.block, repeats)["matmul"]
    return 2.0 * size**3 / min(seconds)


def available_bytes() -> int:
    """Memory the system can still give (``MemAvailable``), or 16 GiB where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 16 * GiB


def plain_bytes(n: int, heads: int, gradient: bool) -> int:
    """What plain attention holds at its peak: float32 ``n x n`` blocks per head (the
    scores, their exponent and the probabilities; under autodiff also their cotangents)."""
    return (5 if gradient else 3) * n * n * heads * 4


def too_big(n: int, heads: int, gradient: bool) -> str | None:
    """Why plain attention is not run at this size (it would not fit), or None."""
    need, budget = plain_bytes(n, heads, gradient), int(0.7 * available_bytes())
    if need <= budget:
        return None
    return f"needs ~{need / GiB:.0f} GiB, {budget / GiB:.0f} GiB free"


class Progress:
    """A one-line progress bar on stderr: steps done, elapsed time and what runs now."""

    def __init__(self, total: int, label: str, stream=None):
        self.total, self.label, self.done = max(total, 1), label, 0
        self.stream = sys.stderr if stream is None else stream
        self.start = time.perf_counter()
        self.tty = getattr(self.stream, "isatty", lambda: False)()

    def step(self, what: str) -> None:
        """Show ``what`` as running; call :meth:`advance` when it is done."""
        filled = round(20 * self.done / self.total)
        elapsed = time.perf_counter() - self.start
        line = (
            f"[{'#' * filled}{'.' * (20 - filled)}] {self.done}/{self.total} "
            f"{elapsed // 60:.0f}m{elapsed % 60:02.0f}s {self.label}: {what}"
        )
        end = "\r" if self.tty else "\n"
        self.stream.write(f"\x1b[2K{line}{end}" if self.tty else f"{line}{end}")
        self.stream.flush()

    def advance(self, steps: int = 1) -> None:
        self.done = min(self.total, self.done + steps)

    def close(self) -> None:
        if self.tty:
            self.stream.write("\x1b[2K")
            self.stream.flush()


def machine() -> str:
    """The CPU the figures come from, e.g. ``"AMD EPYC, 2 CPUs, AVX-512"``: timings and
    matmul rates differ between machines of one kind (an AVX2 host and an AVX-512 one)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    vector = next((name for flag, name in _VECTOR_UNITS if flag in flags), None)
    return ", ".join(x for x in (model, f"{os.cpu_count()} CPUs", vector) if x)


_VECTOR_UNITS = (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("asimd", "NEON"))


@dataclass
class Report:
    """One benchmark's result: a markdown table (with a caption) and the raw figures."""

    name: str
    caption: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    raw: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    machine: str = field(default_factory=machine)

    def add_device(self, lines: list[dict]) -> None:
        """Name in :attr:`machine` the device that a worker's ``device`` line reports."""
        for line in lines:
            if "device" in line and line["device"] not in self.machine:
                self.machine += f"; {line['device']}"

    def markdown(self) -> str:
        lines = [self.caption, "", "| " + " | ".join(self.columns) + " |"]
        lines.append("|" + "---|" * len(self.columns))
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        lines += ["", *self.notes] if self.notes else []
        return "\n".join([*lines, "", f"Machine: {self.machine}."])

    def write(self, out: Path) -> list[Path]:
        """``out/<name>.md`` and ``out/<name>.json``; returns the paths written."""
        out.mkdir(parents=True, exist_ok=True)
        md, raw = out / f"{self.name}.md", out / f"{self.name}.json"
        md.write_text(self.markdown() + "\n")
        figures = {**self.raw, "machine": self.machine}
        raw.write_text(json.dumps(figures, indent=2, default=_jsonable) + "\n")
        return [md, raw]


def _jsonable(x):
    return None if isinstance(x, float) and not math.isfinite(x) else str(x)


def ms(seconds: float | None) -> str:
    """Milliseconds with 3 significant digits at most where it matters; '—' for None."""
    if seconds is None:
        return "—"
    value = seconds * 1e3
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 1 else f"{value:.2f}"


def mib(n_bytes: int | None) -> str:
    if n_bytes is None:
        return "—"
    value = n_bytes / MiB
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def ratio(a: float | None, b: float | None) -> str:
    """``a / b`` as ``1.23x``; '—' if either is missing."""
    if a is None or b is None or b == 0:
        return "—"
    return f"{a / b:.2f}x" if a / b < 100 else f"{a / b:.0f}x"
