"""What models need, beyond the case table: dropout's mask is the documented hash on every
backend, for any chunk sizes and either layout; segment ids skip work and stay data."""

from __future__ import annotations

import numpy as np
import pytest

import uniattn
from uniattn import reference

from .cases import CASES
from .harness import prepare
from .tolerances import assert_close


def _kept(backend, rate, seed, batch=(2,), heads=3, q_len=13, kv_len=29, **options):
    """The dropout mask ``[*batch, heads, q_len, kv_len]`` as the backend applies it: with
    q = 0 every probability is ``1 / kv_len``, and with the identity as values each output
    entry is one probability, kept and scaled or dropped."""
    q = np.zeros((*batch, q_len, heads, 4))
    k = np.zeros((*batch, kv_len, heads, 4))
    v = np.broadcast_to(np.eye(kv_len)[:, None, :], (*batch, kv_len, heads, kv_len))
    q, k, v = (backend.asarray(x, "float64") for x in (q, k, v))
    out = uniattn.attention(q, k, v, dropout_rate=rate, dropout_seed=seed, **options)
    out = np.swapaxes(backend.to_numpy(out), -3, -2) * kv_len * (1.0 - rate)
    kept = np.round(out)
    np.testing.assert_allclose(out, kept, atol=1e-9)  # exactly 0 or 1
    return kept.astype(bool)


@pytest.mark.parametrize(("rate", "seed"), [(0.1, 0), (0.5, 12345), (0.9, -7), (0.3, 2**40 + 3)])
def test_dropout_mask_is_the_documented_hash(backend, rate, seed):
    kept = _kept(backend, rate, seed, query_chunk_size=5, key_chunk_size=8)
    np.testing.assert_array_equal(kept, reference.dropout_keep(seed, rate, kept.shape))


def test_dropout_mask_ignores_chunks_and_layout(backend):
    case = CASES["dropout-causal-uneven"]
    p = prepare(backend, case, "float64")
    base = backend.to_numpy(p.call(*p.primals()))
    for chunks in [(1, 1), (37, 41), (8, 3)]:
        out = p.call(*p.primals(), query_chunk_size=chunks[0], key_chunk_size=chunks[1])
        assert_close(backend.to_numpy(out), base, "float64", what=f"chunks {chunks}")
    swapped = [
        backend.asarray(np.swapaxes(p.rounded[n], -3, -2)) for n in ("query", "key", "value")
    ]
    bhtd = backend.to_numpy(p.call(*swapped, layout="BHTD"))
    assert_close(np.swapaxes(bhtd, -3, -2), base, "float64", what="BHTD")


def test_dropout_seed_and_rate(backend):
    """The same seed gives the same mask; another seed another; rate 0 keeps everything;
    the logsumexp does not depend on dropout."""
    a, b = _kept(backend, 0.5, 1), _kept(backend, 0.5, 1)
    np.testing.assert_array_equal(a, b)
    assert (a != _kept(backend, 0.5, 2)).mean() > 0.3
    assert _kept(backend, 0.0, 3).all()
    p = prepare(backend, CASES["dropout"], "float64")
    _, lse = p.call(*p.primals(), return_lse=True)
    _, plain = p.call(*p.primals(), return_lse=True, dropout_rate=0.0)
    np.testing.assert_array_equal(backend.to_numpy(lse), backend.to_numpy(plain))


def test_dropout_seed_may_be_an_array(backend):
    p = prepare(backend, CASES["dropout"], "float64")
    seed = backend.asarray(np.array(CASES["dropout"].dropout_seed, np.int32))
    out = p.call(*p.primals(), dropout_seed=seed)
    assert_close(backend.to_numpy(out), p.reference_output(), "float64", what="array seed")


def test_sinks_rows_that_see_no_key(backend):
    """A row that sees no key gives 0 and the sink as its logsumexp."""
    p = prepare(backend, CASES["sinks-masked-rows"], "float64")
    out, lse = p.call(*p.primals(), return_lse=True)
    out, lse = backend.to_numpy(out), backend.to_numpy(lse)
    sinks = np.broadcast_to(p.rounded["sinks"], lse.shape[:-1])
    for row in CASES["sinks-masked-rows"].masked_rows:
        np.testing.assert_array_equal(out[..., row, :, :], 0.0)
        np.testing.assert_allclose(lse[..., row], sinks, rtol=1e-15)


def test_top_left_and_bottom_right_agree_when_lengths_match(backend):
    p = prepare(backend, CASES["causal"], "float64")
    outs = [backend.to_numpy(p.call(*p.primals(), causal=c)) for c in (True, "top_left")]
    np.testing.assert_array_equal(outs[0], outs[1])


def test_segment_ids_are_data(backend):
    """A new packing of the same shape gives that packing's result from the same call
    (compiled once where the backend compiles)."""
    p = prepare(backend, CASES["packed-causal"], "float64")
    ids = p.rounded["q_segment_ids"]
    fn = backend.jit(lambda seg, *primals: p.call(*primals, segment_ids=seg))
    for shift in (0, 5, 21):
        moved = np.where(ids >= 0, np.minimum(ids, (np.arange(ids.shape[-1]) + shift) // 16), -1)
        out = backend.to_numpy(fn(backend.asarray(moved.astype(np.int32)), *p.primals()))
        r = p.rounded
        kwargs = {**p.reference_kwargs(), "segment_ids": moved}
        expected = reference.attention(r["query"], r["key"], r["value"], **kwargs)
        assert_close(out, expected, "float64", what=f"packing shifted by {shift}")
