"""Adversarial values on every backend: non-finite inputs, huge logits, -inf biases.

The rule for non-finite inputs (docs/semantics.md, "Non-finite inputs"): a NaN or
inf in a query, key or value turns NaN exactly the output rows (and lse) that attend it;
every other row is exactly what it would be without it. Under ``backward="custom"`` the
gradients treat those rows as constants, so every gradient stays finite and the others
are exact.
"""

from __future__ import annotations

import numpy as np
import pytest

import uniattn
from uniattn import reference

from .tolerances import assert_close, assert_gradients_close

Q_LEN, KV_LEN, HEADS, D = 11, 14, 2, 8
# Overlapping last chunks on both axes. The rules are the chunked algorithm's (the default
# implementation takes it for non-finite inputs; a fused kernel computes a clean call to its
# own rounding, which "exactly the call without the bad entry" would compare).
CHUNKS = dict(query_chunk_size=4, key_chunk_size=5, implementation="chunked")
BAD_ROW, BAD_KEY, BAD_HEAD = 6, 7, 1
STRUCTURES = {
    "causal": dict(causal=True),
    "window": dict(window=(2, 1)),
    "mask": dict(mask=np.random.default_rng(3).random((1, 1, Q_LEN, KV_LEN)) < 0.6),
    "key-lengths": dict(causal=True, key_lengths=np.array([12, 9])),
}


def _inputs(where: str, value: float, q_len: int = Q_LEN, kv_len: int = KV_LEN):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, q_len, HEADS, D))
    k = rng.standard_normal((2, kv_len, HEADS, D))
    v = rng.standard_normal((2, kv_len, HEADS, D))
    clean = {"query": q, "key": k, "value": v}
    bad = {n: x.copy() for n, x in clean.items()}
    index = BAD_ROW if where == "query" else BAD_KEY
    bad[where][:, index, BAD_HEAD, 3] = value
    return clean, bad


def _attending(where: str, structure: dict, q_len: int, kv_len: int) -> np.ndarray:
    """``[batch, q_len, heads]``: the rows that attend the bad entry, found with a probe
    (zero scores, a value of 1 at the bad key only: exactly its viewers get nonzero)."""
    if where == "query":
        rows = np.zeros((2, q_len, HEADS), dtype=bool)
        rows[:, BAD_ROW, BAD_HEAD] = True
        return rows
    probe = np.zeros((2, kv_len, HEADS, 1))
    probe[:, BAD_KEY, BAD_HEAD] = 1.0
    q, k = np.zeros((2, q_len, HEADS, 1)), np.zeros((2, kv_len, HEADS, 1))
    return reference.attention(q, k, probe, **structure)[..., 0] != 0.0


def _to(backend, arrays: dict, dtype: str) -> dict:
    return {n: backend.asarray(x, dtype) for n, x in arrays.items()}


def _kwargs(backend, structure: dict) -> dict:
    return {n: backend.asarray(x) if isinstance(x, np.ndarray) else x for n, x in structure.items()}


@pytest.mark.parametrize("structure", sorted(STRUCTURES))
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["query", "key", "value"])
def test_non_finite_input_affects_only_rows_that_attend_it(backend, where, value, structure):
    _check_non_finite(backend, where, value, STRUCTURES[structure], structure, Q_LEN, KV_LEN)


@pytest.mark.parametrize("where", ["query", "key", "value"])
def test_non_finite_input_with_many_rows_per_key(backend, where):
    """The rule where every key meets many query rows: an adapter may then sanitize every
    call rather than branch on whether the inputs are finite (``Backend.cond_call``)."""
    structure = dict(causal=True, key_lengths=np.array([70, 66]))
    chunks = dict(CHUNKS, query_chunk_size=32, key_chunk_size=32)  # overlapping last chunks
    _check_non_finite(backend, where, np.nan, structure, "causal, key lengths", 67, 70, chunks)


def _check_non_finite(backend, where, value, structure, label, q_len, kv_len, chunks=CHUNKS):
    clean, bad = _inputs(where, value, q_len, kv_len)
    kwargs = {**_kwargs(backend, structure), **chunks}
    repro = f"{backend.name}: {where}[:, {BAD_ROW if where == 'query' else BAD_KEY}] = {value}, {label}, q_len {q_len}"
    arrays = _to(backend, bad, "float64")
    out, lse = uniattn.attention(*arrays.values(), return_lse=True, **kwargs)
    out, lse = backend.to_numpy(out), backend.to_numpy(lse)
    for name, x in bad.items():  # not mutated, NaN included
        np.testing.assert_array_equal(backend.to_numpy(arrays[name]), x, err_msg=name)

    expected, expected_lse = reference.attention(*bad.values(), return_lse=True, **structure)
    affected = np.isnan(expected).any(axis=-1)
    assert np.array_equal(affected, _attending(where, structure, q_len, kv_len)), repro
    assert affected.any() and not affected.all(), repro  # the case exercises the rule
    assert np.array_equal(np.isnan(out).any(axis=-1), affected), f"NaN rows differ\n{repro}"
    assert np.isnan(out[affected]).all() and np.isnan(np.moveaxis(lse, -1, -2)[affected]).all()
    # Every other row: the reference, and exactly the call without the bad entry.
    without = uniattn.attention(*_to(backend, clean, "float64").values(), **kwargs)
    keep = ~affected
    np.testing.assert_array_equal(out[keep], backend.to_numpy(without)[keep], err_msg=repro)
    assert_close(out[keep], expected[keep], "float64", what="unaffected rows", repro=repro)
    assert_close(
        np.moveaxis(lse, -1, -2)[keep],
        np.moveaxis(expected_lse, -1, -2)[keep],
        "float64",
        what="lse of unaffected rows",
        repro=repro,
    )

    # Custom gradients: affected rows are constants; everything finite and exact.
    d_out = np.random.default_rng(1).standard_normal(out.shape)
    _, vjp_fn = uniattn.vjp(*arrays.values(), **kwargs)
    got = dict(
        zip(
            bad,
            (backend.to_numpy(g) for g in vjp_fn(backend.asarray(d_out, "float64"))),
            strict=True,
        )
    )
    ref = reference.vjp(*bad.values(), d_out, **structure)
    want = {"query": ref.dq, "key": ref.dk, "value": ref.dv}
    assert all(np.isfinite(g).all() for g in got.values()), f"non-finite gradient\n{repro}"
    assert_gradients_close(got, want, "float64", what="custom gradients", repro=repro)


@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
def test_non_finite_value_with_zero_width_keys(backend, value):
    """Queries and keys of width 0 (every score 0) have no entry to carry a value's NaN
    into the scores: the rows that attend that value still turn NaN, the others do not,
    and the custom gradients stay finite."""
    rng = np.random.default_rng(4)
    q, k = np.zeros((2, Q_LEN, HEADS, 0)), np.zeros((2, KV_LEN, HEADS, 0))
    v = rng.standard_normal((2, KV_LEN, HEADS, D))
    v[:, BAD_KEY, BAD_HEAD, 3] = value
    kwargs = dict(causal=True, **CHUNKS)
    arrays = _to(backend, {"query": q, "key": k, "value": v}, "float64")
    out, lse = uniattn.attention(*arrays.values(), return_lse=True, **kwargs)
    expected, expected_lse = reference.attention(q, k, v, return_lse=True, causal=True)
    out, lse = backend.to_numpy(out), backend.to_numpy(lse)
    affected = np.isnan(expected).any(axis=-1)
    assert affected.any() and not affected.all()  # the case exercises the rule
    assert np.array_equal(np.isnan(out).any(axis=-1), affected)
    assert np.isnan(out[affected]).all() and np.isnan(np.moveaxis(lse, -1, -2)[affected]).all()
    assert_close(out[~affected], expected[~affected], "float64", what="unaffected rows")
    seen = np.isfinite(expected_lse)
    assert_close(lse[seen], expected_lse[seen], "float64", what="lse of unaffected rows")
    d_out = rng.standard_normal(out.shape)
    grads = uniattn.vjp(*arrays.values(), **kwargs)[1](backend.asarray(d_out, "float64"))
    dq, dk, dv = (backend.to_numpy(g) for g in grads)
    assert dq.shape == q.shape and dk.shape == k.shape and np.isfinite(dv).all()
    assert_close(dv, reference.vjp(q, k, v, d_out, causal=True).dv, "float64", what="dv")


@pytest.mark.parametrize("scale", [1e2, 1e4])
@pytest.mark.parametrize("backward", ["custom", "autodiff"])
def test_huge_logits_stay_finite(backend, scale, backward):
    """Scales up to 1e4 on float32 scores of order 10 (logits ~1e5): every output and
    gradient is finite and the output matches the reference. (Gradient accuracy at such
    logits is bounded by float32's spacing there: see the ``scale-1e4`` case.)"""
    if backward == "autodiff" and not backend.has_autodiff:
        pytest.skip(f"{backend.name} has no autodiff")
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((2, n, HEADS, D)) for n in (Q_LEN, KV_LEN, KV_LEN))
    arrays = _to(backend, {"query": q, "key": k, "value": v}, "float32")
    rounded = [backend.to_numpy(x).astype(np.float64) for x in arrays.values()]
    kwargs = dict(causal=True, scale=scale, **CHUNKS)
    out = backend.to_numpy(uniattn.attention(*arrays.values(), backward=backward, **kwargs))
    assert np.isfinite(out).all()
    expected = reference.attention(*rounded, causal=True, scale=scale)
    assert_close(out, expected, "float32", what=f"scale {scale:g}")
    d_out = backend.asarray(rng.standard_normal(out.shape), "float32")
    if backward == "custom":
        grads = uniattn.vjp(*arrays.values(), **kwargs)[1](d_out)
    else:
        fn = lambda *p: uniattn.attention(*p, backward="autodiff", **kwargs)  # noqa: E731
        grads = backend.vjp(fn, *arrays.values())[1](d_out)
    for name, g in zip("qkv", grads, strict=True):
        assert np.isfinite(backend.to_numpy(g)).all(), f"d{name} at scale {scale:g}"
