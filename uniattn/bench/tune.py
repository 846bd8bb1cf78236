"""``tune``: the chunk-size sweep behind each backend's default (query, key) chunk sizes.

Forward+backward (NumPy: forward) time over query x key chunk sizes at n 8192 (``--quick``:
2048), 4 heads, d 64, float32, without a mask and causal; medians of interleaved
repetitions in one process. The fastest pair over both is the one to make the default.
``--device`` sweeps on that device, with larger chunks on an accelerator (each chunk is
a few kernel launches there, whose fixed cost larger chunks spread).
"""

from __future__ import annotations

import itertools

from uniattn import backends
from uniattn._measure import gradients, harness, interleaved_medians
from uniattn.bench._common import Progress, Report, inputs, ms

SIZES = {"cpu": (128, 256, 512, 1024), "accelerator": (256, 512, 1024, 2048, 4096)}


def run(names, quick: bool = False, full: bool = False, device: str | None = None) -> Report:
    import uniattn

    n = 2048 if quick else 8192
    where = f" on {device}" if device else ""
    report = Report(
        "tune",
        f"Chunk sizes, n {n}, 4 heads, d 64, float32{where}: forward+backward ms (NumPy: "
        "forward), without a mask and causal; * marks each backend's current default.",
        ["backend", "query chunk", "key chunk", "full ms", "causal ms", "sum ms", "vs best"],
        raw={"n": n, "backends": {}},
    )
    progress = Progress(len(names), "tune")
    for name in names:
        backend = harness(name, device)
        q, k, v, d_out = inputs(backend, n, heads=4)
        platform = backend.platform(q)
        sizes = SIZES["cpu" if platform == "cpu" else "accelerator"]
        pairs = [(a, b) for a, b in itertools.product(sizes, sizes) if a <= b]
        adapter = backends.load(name)  # the algorithm's adapter holds the defaults
        default = adapter.chunk_sizes(adapter.device(q), decoding=False)
        progress.step(f"{name}: {len(pairs) * 2} settings")

        def timed(a, b, causal, backend=backend, q=q, k=k, v=v, d_out=d_out):
            kw = dict(query_chunk_size=a, key_chunk_size=b, causal=causal, implementation="chunked")
            if not backend.has_autodiff:  # NumPy: the forward (see the caption)
                return lambda: uniattn.attention(q, k, v, **kw)
            run = gradients(backend, **kw)
            return lambda: run(q, k, v, d_out)

        fns = {(a, b, c): timed(a, b, c) for a, b in pairs for c in (False, True)}
        seconds = interleaved_medians(fns, backend.block, repeats=2 if quick else 3)
        progress.advance()
        total = {p: seconds[(*p, False)] + seconds[(*p, True)] for p in pairs}
        best = min(total.values())
        report.raw["backends"][name] = {
            f"{a}x{b}": [seconds[(a, b, False)], seconds[(a, b, True)]] for a, b in pairs
        }
        for a, b in sorted(pairs, key=total.get):
            mark = "*" if (a, b) == default else ""
            report.rows.append(
                [
                    f"{name}{mark}",
                    str(a),
                    str(b),
                    ms(seconds[(a, b, False)]),
                    ms(seconds[(a, b, True)]),
                    ms(total[(a, b)]),
                    f"{total[(a, b)] / best:.2f}x",
                ]
            )
    progress.close()
    return report
