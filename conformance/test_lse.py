"""return_lse: the per-row logsumexp, and merging partial attentions through it."""

from __future__ import annotations

import numpy as np
import pytest

import uniattn
from uniattn import reference

from .cases import CASES, Case
from .harness import prepare
from .tolerances import assert_close, assert_gradients_close

LSE_CASES = [
    "causal-q-longer",
    "mask-and-bias-causal",
    "gqa-mask-bhtd",
    "query-lengths",
    "callables-window-lengths",
    "decode-gqa-lengths",
    "sinks-masked-rows",
    "sinks-decode",
    "packed-padding-gqa",
    "everything",
]


@pytest.mark.parametrize("name", LSE_CASES)
def test_lse_matches_reference(backend, name):
    p = prepare(backend, CASES[name], "float64")
    out, lse = p.call(*p.primals(), return_lse=True)
    r = p.rounded
    ref_out, ref_lse = reference.attention(
        r["query"],
        r["key"],
        r["value"],
        bias=r["bias"],
        sinks=r["sinks"],
        return_lse=True,
        **p.reference_kwargs(),
    )
    lse = backend.to_numpy(lse)
    assert lse.shape == ref_lse.shape
    assert backend.dtype_name(p.call(*p.primals(), return_lse=True)[1]) == "float64"
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse), err_msg=p.repro)
    finite = np.isfinite(ref_lse)
    assert_close(lse[finite], ref_lse[finite], "float64", what="lse", repro=p.repro)
    assert_close(backend.to_numpy(out), ref_out, "float64", what="output", repro=p.repro)


def test_lse_is_float32_for_16bit(backend):
    dtype = "float16"
    p = prepare(backend, CASES["basic"], dtype)
    out, lse = p.call(*p.primals(), return_lse=True)
    assert backend.dtype_name(out) == dtype
    assert backend.dtype_name(lse) == "float32"


MERGE = Case("merge", 24, 40, heads=4, kv_heads=2, bias=(4, 24, 40), chunks=(8, 8))


def _merged(backend, q, k, v, bias, split):
    """Attention over all keys, assembled from two halves by their logsumexps."""
    xp = backend.namespace()
    parts = [
        uniattn.attention(
            q,
            k[:, :split, ...],
            v[:, :split, ...],
            bias=bias[..., :split],
            return_lse=True,
            query_chunk_size=8,
            key_chunk_size=8,
        ),
        uniattn.attention(
            q,
            k[:, split:, ...],
            v[:, split:, ...],
            bias=bias[..., split:],
            return_lse=True,
            query_chunk_size=8,
            key_chunk_size=8,
        ),
    ]
    (o1, l1), (o2, l2) = parts
    m = xp.maximum(l1, l2)
    lse = m + xp.log(xp.exp(l1 - m) + xp.exp(l2 - m))

    def weight(lse_part):  # [b, heads, q] -> [b, q, heads, 1], the output's BTHD layout
        w = xp.exp(lse_part - lse)
        return xp.reshape(xp.permute_dims(w, (0, 2, 1)), (*w.shape[:1], w.shape[2], w.shape[1], 1))

    return o1 * weight(l1) + o2 * weight(l2)


def test_merge_halves_forward(backend):
    p = prepare(backend, MERGE, "float64")
    q, k, v, bias = p.primals()
    merged = backend.to_numpy(_merged(backend, q, k, v, bias, split=17))
    assert_close(merged, p.reference_output(), "float64", what="merged halves", repro=p.repro)


@pytest.mark.needs_autodiff
def test_merge_halves_gradients(backend):
    """Gradients flow through lse: the merged halves differentiate like the whole."""
    p = prepare(backend, MERGE, "float64")
    _, vjp_fn = backend.vjp(lambda *a: _merged(backend, *a, split=17), *p.primals())
    grads = vjp_fn(p.arrays["d_out"])
    actual = {n: backend.to_numpy(g) for n, g in zip(p.reference_gradients(), grads, strict=True)}
    assert_gradients_close(
        actual, p.reference_gradients(), "float64", what="through merged halves", repro=p.repro
    )


def test_vjp_with_lse_cotangent(backend):
    """uniattn.vjp with return_lse: a cotangent on lse adds P * d_lse to dS."""
    p = prepare(backend, MERGE, "float64")
    q, k, v, bias = p.primals()
    rng = np.random.default_rng(7)
    d_lse = rng.standard_normal((2, 4, 24))
    _, vjp_fn = uniattn.vjp(
        q, k, v, bias=bias, return_lse=True, query_chunk_size=8, key_chunk_size=5
    )
    grads = vjp_fn((p.arrays["d_out"], backend.asarray(d_lse, "float64")))
    # reference: d/dx [sum(out * d_out) + sum(lse * d_lse)]; the lse part, by the softmax rule,
    # is the gradient of sum(out' * d_out') with a value column of ones scaled by d_lse.
    r = p.rounded
    s = np.einsum("bqhd,bkhd->bhqk", r["query"], np.repeat(r["key"], 2, axis=2)) / np.sqrt(8)
    s = s + r["bias"]
    prob = np.exp(s - s.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    ref = reference.vjp(r["query"], r["key"], r["value"], r["d_out"], bias=r["bias"])
    ds_lse = prob * d_lse[..., None]  # d lse_i / d s_ij = p_ij
    k_rep = np.repeat(r["key"], 2, axis=2)
    expected = {
        "query": ref.dq + np.einsum("bhqk,bkhd->bqhd", ds_lse, k_rep) / np.sqrt(8),
        "key": ref.dk
        + np.einsum("bhqk,bqhd->bkhd", ds_lse, r["query"]).reshape(2, 40, 2, 2, 8).sum(3)
        / np.sqrt(8),
        "value": ref.dv,
        "bias": ref.d_bias + ds_lse.sum(0),
    }
    actual = {n: backend.to_numpy(g) for n, g in zip(expected, grads, strict=True)}
    assert_gradients_close(actual, expected, "float64", what="with d_lse", repro=p.repro)
