"""The dropout hash (``uniattn.reference.dropout_keep``) and its int32 form
(``uniattn._dropout``): the same bits, the kept fraction asked for, and no dependence
between neighbouring entries. The bounds are six standard deviations of the binomial: the
inputs are fixed, so each test either always passes or always fails."""

from __future__ import annotations

import array_api_compat.numpy as xp
import numpy as np
import pytest
from uniattn.backends.numpy import backend

from uniattn import _dropout, reference

SHAPE = (2, 4, 256, 512)  # 1M entries


def _sigmas(observed, expected_rate, n):
    return abs(observed - expected_rate) / np.sqrt(expected_rate * (1 - expected_rate) / n)


@pytest.mark.parametrize("rate", [0.01, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("seed", [0, 1, 2**31 + 17])
def test_kept_fraction(rate, seed):
    kept = reference.dropout_keep(seed, rate, SHAPE)
    assert _sigmas(kept.mean(), 1 - rate, kept.size) < 6


def test_neighbours_are_independent():
    """P(keep a and keep b) = P(keep)² for neighbours along every axis (batch, head,
    query, key) and along the diagonal, and across two seeds."""
    rate = 0.5
    kept = reference.dropout_keep(3, rate, SHAPE)
    pairs = {
        "key": (kept[..., :-1], kept[..., 1:]),
        "query": (kept[..., :-1, :], kept[..., 1:, :]),
        "head": (kept[:, :-1], kept[:, 1:]),
        "batch": (kept[:-1], kept[1:]),
        "diagonal": (kept[..., :-1, :-1], kept[..., 1:, 1:]),
        "seed": (kept, reference.dropout_keep(4, rate, SHAPE)),
    }
    p = (1 - rate) ** 2
    for axis, (a, b) in pairs.items():
        both = np.mean(a & b)
        assert _sigmas(both, p, a.size) < 6, axis


def test_rows_of_bits_look_uniform():
    """Each bit of the hash is set half the time (a weak bit would skew some rates)."""
    h = _dropout.Hash(xp, None)
    row_seeds = h.row_seeds(
        np.array([9], np.int32), np.zeros((1, 1, 1), np.int32), np.zeros((1, 1), np.int32)
    )
    i, j = np.arange(512, dtype=np.int32)[:, None], np.arange(1024, dtype=np.int32)[None, :]
    row = h.fmix(np.bitwise_xor(row_seeds, i))
    x = np.bitwise_xor(row, h.fmix(np.bitwise_xor(j, h.const["key_salt"]))) * h.const["final"]
    x = x.view(np.uint32)
    for bit in range(32):
        assert _sigmas(np.mean((x >> np.uint32(bit)) & np.uint32(1)), 0.5, x.size) < 6, bit


@pytest.mark.parametrize("rate", [0.0, 0.25, 0.7, 1 - 2**-33])
def test_int32_form_matches_the_statement(rate):
    seed = np.array([-123456789], np.int32)  # the low 32 bits of 2**32 - 123456789
    h = _dropout.Hash(xp, None)
    batch = np.arange(2, dtype=np.int32).reshape(2, 1, 1, 1)
    heads = np.arange(3, dtype=np.int32).reshape(3, 1, 1)
    rows = h.row_seeds(seed, batch, heads)
    i, j = np.arange(40, dtype=np.int32)[:, None], np.arange(70, dtype=np.int32)[None, :]
    kept = h.keep(backend, rows, i, j, _dropout.threshold(rate))
    expected = reference.dropout_keep(2**32 - 123456789, rate, (2, 3, 40, 70))
    np.testing.assert_array_equal(kept, expected)
