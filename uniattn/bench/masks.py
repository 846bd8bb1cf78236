"""``masks``: what skipping fully masked chunks saves, and what dropout costs.

float32, batch 1, 4 heads, d 64, medians of 5 interleaved repetitions, forward and
forward+backward (``backward="custom"``), each staged as ``bench speed`` stages it (JAX:
``jax.jit``) and against its baseline: causal against full attention at n 8192; window
(256, 0) against full at n 16384; 8 documents of n / 8 packed (segment ids) and causal
against whole-sequence causal at n 8192; dropout 0.1 against none at n 2048 (its "speed-up"
is below 1: the cost); and decoding one query against a 32768-long cache (32 heads on 8 kv
heads, d 128) against the framework's plain attention.
``--quick``: n 2048 / 4096 / 2048 / 1024 / 8192.
"""

from __future__ import annotations

import functools

import numpy as np

import uniattn
from uniattn._measure import gradients, harness, interleaved_medians
from uniattn.bench._common import Report, inputs


def run(names, quick: bool = False, full: bool = False) -> Report:
    n_causal, n_window, n_cache = (2048, 4096, 8192) if quick else (8192, 16384, 32768)
    n_dropout = 1024 if quick else 2048
    dropout = {"dropout_rate": 0.1, "dropout_seed": 0}
    settings = [  # label, n, masked options, its baseline's options
        ("causal", n_causal, {"causal": True}, {}),
        ("window (256, 0)", n_window, {"window": (256, 0)}, {}),
        ("packed 8 docs, causal (vs causal)", n_causal, {"causal": True, "documents": 8}, None),
        ("dropout 0.1 (vs none)", n_dropout, dropout, {}),
    ]
    report = Report(
        "masks",
        "skipping fully masked chunks: float32, batch 1, 4 heads, d 64, median of 5 "
        "interleaved repetitions; fwd+bwd with backward='custom'",
        [
            "backend",
            "mask",
            "n",
            "masked ms",
            "full ms",
            "speed-up",
            "masked fwd+bwd ms",
            "full fwd+bwd ms",
            "speed-up",
        ],
        raw={"backends": {}},
    )
    for name in names:
        backend = harness(name)
        report.raw["backends"][name] = entry = {}
        for label, n, kwargs, baseline in settings:
            t = _masked_and_full_times(backend, n, kwargs, baseline)
            entry[label] = {"n": n, "seconds": t}
            report.rows.append(
                [
                    name,
                    label,
                    str(n),
                    f"{t['masked'] * 1e3:.0f}",
                    f"{t['full'] * 1e3:.0f}",
                    f"{t['full'] / t['masked']:.2f}x",
                    f"{t['masked_grad'] * 1e3:.0f}",
                    f"{t['full_grad'] * 1e3:.0f}",
                    f"{t['full_grad'] / t['masked_grad']:.2f}x",
                ]
            )
        entry["decode"] = decode = _decode_times(backend, n_cache)
        report.rows.append(
            [
                name,
                "decode, 1 query, 32 heads / 8 kv heads, d 128",
                str(n_cache),
                f"{decode['uniattn'] * 1e3:.1f}",
                f"plain {decode['plain'] * 1e3:.1f}",
                f"{decode['plain'] / decode['uniattn']:.2f}x",
                "",
                "",
                "",
            ]
        )
    return report


def _masked_and_full_times(backend, n: int, kwargs: dict, baseline: dict | None) -> dict:
    """Forward and forward+backward medians with the options ``kwargs`` and with
    ``baseline`` (None: ``kwargs`` without the packing); the backward is uniattn's
    (``uniattn.vjp`` on NumPy). ``documents=D`` in ``kwargs`` packs D equal documents."""
    q, k, v, d_out = inputs(backend, n, heads=4)
    kwargs = dict(kwargs, implementation="chunked")  # what skipping chunks saves
    documents = kwargs.pop("documents", None)
    baseline = dict(kwargs) if baseline is None else dict(baseline, implementation="chunked")
    ids = None
    if documents is not None:
        ids = backend.asarray(np.repeat(np.arange(documents, dtype=np.int32), n // documents)[None])

    # Staged as a user compiles a step (`jax.jit`, `tf.function`), like `bench speed`,
    # with the ids an argument (data, not a constant of the compiled function).
    def forward(options):
        return lambda q, k, v, ids: uniattn.attention(q, k, v, **options, **_packed(ids))

    def backward(options):
        return lambda q, k, v, d_out, ids: gradients(backend, **options, **_packed(ids))(
            q, k, v, d_out
        )

    runs = {
        "masked": (forward(kwargs), (q, k, v, ids)),
        "full": (forward(baseline), (q, k, v, None)),
        "masked_grad": (backward(kwargs), (q, k, v, d_out, ids)),
        "full_grad": (backward(baseline), (q, k, v, d_out, None)),
    }
    fns = {name: functools.partial(backend.stage(fn), *args) for name, (fn, args) in runs.items()}
    return interleaved_medians(fns, backend.block, repeats=5)


def _packed(ids) -> dict:
    return {} if ids is None else {"segment_ids": ids}


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
        "uniattn": lambda: uniattn.attention(q, k, v, causal=True, implementation="chunked"),
        "plain": lambda: plain_attention(backend, q, k_rep, v_rep),
    }
    return interleaved_medians(fns, backend.block, repeats=5)
