"""The chunk geometry and the loop schedule (``uniattn._schedule``).

Geometry: cutting an axis into chunks and joining per-chunk results give back the array,
for every length and chunk size, overlapping last chunk included. Schedule: for every row
block (forward) and key chunk (backward) of many small configurations, the bands are
consecutive and within their trip counts, no visible chunk is left out, and a band computed
without the structural mask only holds chunks that every row sees whole.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from uniattn.backends.numpy import backend

from uniattn._schedule import Axis, Schedule, join, maximum, minimum, select, split

WINDOWS = [(None, None), (None, 0), (0, 0), (3, 0), (None, 2), (5, None), (2, 7), (0, None)]


def _context(q_len, kv_len, q_chunk, k_chunk, window, groups=1, k_max=None):
    folded = q_len == 1 and groups > 1
    return Schedule(
        backend.namespace(),
        q_len=q_len,
        kv_len=kv_len,
        rows=groups if folded else q_len,
        folded=folded,
        query_chunk=q_chunk,
        key_chunk=k_chunk,
        left=window[0],
        right=window[1],
        k_max=None if k_max is None else np.asarray(k_max, dtype=np.int32),
    )


def _visible(c, q_positions, k_positions):
    """[rows, keys] bool: which query positions see which keys by window and causal."""
    diagonal = np.asarray(q_positions)[:, None] + (c.kv_len - c.q_len)
    keys = np.asarray(k_positions)[None, :]
    seen = np.ones(diagonal.shape[:1] + keys.shape[1:], dtype=bool)
    if c.right is not None:
        seen &= keys <= diagonal + c.right
    if c.left is not None:
        seen &= keys >= diagonal - c.left
    return seen


def _check_bands(bands, lower_bound, stop):
    as_int = [(int(b.lower), int(b.upper), b.trips, b.masked) for b in bands]
    first = as_int[0][0] if as_int else None
    for (_, upper, _, _), (lower, _, _, _) in itertools.pairwise(as_int):
        assert upper == lower, as_int  # consecutive
    for lower, upper, trips, _ in as_int:
        assert lower >= lower_bound and max(upper - lower, 0) <= trips, as_int
    if as_int:
        assert max(as_int[-1][1], first) <= stop
    return [(range(lo, up), masked) for lo, up, _, masked in as_int]


def _configs():
    for q_len, kv_len in [(1, 9), (7, 7), (8, 8), (5, 13), (13, 5), (16, 16)]:
        for q_chunk, k_chunk in [(2, 3), (4, 4), (3, 2), (8, 1)]:
            for window in WINDOWS:
                for k_max in (None, kv_len - 2):
                    yield q_len, kv_len, q_chunk, k_chunk, window, k_max


@pytest.mark.parametrize("groups", [1, 3], ids=["rows", "folded-heads"])
def test_key_bands_cover_every_visible_chunk_and_whole_means_unmasked(groups):
    checked_whole = 0
    for q_len, kv_len, q_chunk, k_chunk, window, k_max in _configs():
        c = _context(q_len, kv_len, q_chunk, k_chunk, window, groups, k_max)
        key_limit = kv_len if k_max is None else k_max
        for r in range(c.rows.count):
            start = c.rows.start(r)
            positions = [0] if c.folded else range(start, start + c.rows.size)
            bands = _check_bands(c.key_bands(r), 0, c.keys.count)
            looped = {j for chunks, _ in bands for j in chunks}
            for j in range(c.keys.count):
                own = range(max(c.keys.start(j), j * c.keys.size), c.keys.start(j) + c.keys.size)
                seen = _visible(c, positions, own) & (np.asarray(own) < key_limit)
                assert j in looped or not seen.any(), (q_len, kv_len, window, r, j)
            for chunks, masked in bands:
                for j in chunks if not masked else ():
                    span = range(c.keys.start(j), c.keys.start(j) + c.keys.size)
                    assert c.keys.start(j) == j * c.keys.size, "an overlapping chunk is masked"
                    assert _visible(c, positions, span).all(), (q_len, kv_len, window, r, j)
                    checked_whole += 1
    assert checked_whole > 100  # the check above ran on many whole chunks


def test_row_bands_cover_every_visible_block_and_whole_means_unmasked():
    checked_whole = 0
    for q_len, kv_len, q_chunk, k_chunk, window, k_max in _configs():
        c = _context(q_len, kv_len, q_chunk, k_chunk, window, 1, k_max)
        for j in range(c.keys.count):
            own = range(max(c.keys.start(j), j * c.keys.size), c.keys.start(j) + c.keys.size)
            bands = _check_bands(c.row_bands(j), 0, c.rows.count)
            looped = {r for rows, _ in bands for r in rows}
            for r in range(c.rows.count):
                nominal = range(
                    max(c.rows.start(r), r * c.rows.size), c.rows.start(r) + c.rows.size
                )
                seen = _visible(c, nominal, own)
                visible = seen.any() and (k_max is None or own[0] < k_max)
                assert r in looped or not visible, (q_len, kv_len, window, j, r)
            for rows, masked in bands:
                for r in rows if not masked else ():
                    start = c.rows.start(r)
                    assert start == r * c.rows.size, "an overlapping block is masked"
                    assert c.keys.start(j) == j * c.keys.size, "an overlapping chunk is masked"
                    span = range(start, start + c.rows.size)
                    keys = range(c.keys.start(j), c.keys.start(j) + c.keys.size)
                    assert _visible(c, span, keys).all(), (q_len, kv_len, window, j, r)
                    checked_whole += 1
    assert checked_whole > 100


@pytest.mark.parametrize(("length", "size"), [(1, 1), (7, 1), (7, 3), (8, 4), (9, 4), (5, 5)])
def test_split_and_join_give_back_the_array(length, size):
    """Chunks of one static size; the last overlaps its predecessor where ``size`` does not
    divide ``length``, and joining drops the overlap."""
    xp = backend.namespace()
    cut = Axis(length, size, xp)
    x = np.arange(2 * length * 3, dtype=np.float64).reshape(2, length, 3)
    chunks = split(xp, x, -2, cut).chunks
    assert chunks.shape == (cut.count, 2, size, 3)
    for i in range(cut.count):
        start = cut.start(i)
        assert start == min(i * size, length - size)
        np.testing.assert_array_equal(chunks[i], x[:, start : start + size])
    np.testing.assert_array_equal(join(xp, chunks, -2, cut), x)
    assert cut.overlaps == (length % size != 0)


def test_a_broadcast_axis_is_not_cut():
    xp = backend.namespace()
    x = np.ones((2, 1, 3))
    whole = split(xp, x, -2, Axis(6, 2, xp))
    assert whole.chunks is None and whole.at(1) is x
    assert split(xp, None, -2, Axis(6, 2, xp)).at(0) is None


def test_bounds_stay_ints_where_they_are_static():
    xp = backend.namespace()
    assert minimum(xp, 3, 5) == 3 and type(minimum(xp, 3, 5)) is int
    assert maximum(xp, 3, 5) == 5 and select(xp, False, 1, 2) == 2
    array = np.asarray(4, dtype=np.int32)
    assert int(minimum(xp, 6, array)) == 4 and int(maximum(xp, array, 6)) == 6
    assert int(select(xp, array > 3, 1, 2)) == 1


def _segmented(q_len, kv_len, q_chunk, k_chunk, q_ids, kv_ids):
    return Schedule(
        backend.namespace(),
        q_len=q_len,
        kv_len=kv_len,
        rows=q_len,
        folded=False,
        query_chunk=q_chunk,
        key_chunk=k_chunk,
        left=None,
        right=None,
        q_ids=q_ids,
        kv_ids=kv_ids,
    )


def _looped(bands, one_segment=None):
    """The chunks the bands loop over (only those of ``one_segment`` bands if given)."""
    return {
        i
        for b in bands
        if one_segment is None or b.one_segment == one_segment
        for i in range(int(b.lower), int(b.upper))
    }


def _pair_ids(s, q_ids, kv_ids, r, j):
    rows = slice(s.rows.start(r), s.rows.start(r) + s.rows.size)
    keys = slice(s.keys.start(j), s.keys.start(j) + s.keys.size)
    return q_ids[:, rows], kv_ids[:, keys]


def _ids_match(s, q_ids, kv_ids, r, j) -> bool:
    """Whether a query and a key of the pair share a valid id in some batch element."""
    a, b = _pair_ids(s, q_ids, kv_ids, r, j)
    return bool(np.any((a[:, :, None] == b[:, None, :]) & (a[:, :, None] >= 0)))


def _one_id(s, q_ids, kv_ids, r, j) -> bool:
    """Whether every query and key of the pair hold the same valid id, in every batch
    element."""
    a, b = _pair_ids(s, q_ids, kv_ids, r, j)
    first = a[:, :1]
    return bool(np.all(first >= 0) and np.all(a == first) and np.all(b == first))


def _ranges_overlap(s, q_ids, kv_ids, r, j) -> bool:
    """Whether the pair's ranges of valid ids overlap in some batch element."""
    for a, b in zip(*_pair_ids(s, q_ids, kv_ids, r, j), strict=True):
        a, b = a[a >= 0], b[b >= 0]
        if a.size and b.size and a.min() <= b.max() and b.min() <= a.max():
            return True
    return False


@pytest.mark.parametrize("sort", [True, False], ids=["packed", "shuffled"])
def test_segment_bands_cover_matching_pairs_and_skip_disjoint_ones(sort):
    """Every chunk pair holding a query and a key with the same valid id is computed; with
    ids that do not decrease along the sequence (one batch element), no pair whose id ranges
    are disjoint is. A pair goes without the segment rule only if all its queries and keys
    hold one valid id; with such ids, every such pair does."""
    rng = np.random.default_rng(0)
    skipped = one_segment = 0
    for q_len, kv_len, q_chunk, k_chunk in [(40, 40, 8, 8), (37, 53, 5, 7), (64, 64, 16, 4)]:
        for _ in range(20):
            high = rng.integers(2, 6)  # long and short documents
            q_ids = rng.integers(-1, high, size=(2, q_len)).astype(np.int32)
            kv_ids = rng.integers(-1, high, size=(2, kv_len)).astype(np.int32)
            if sort:  # one batch element: the bands are the union over the batch
                q_ids, kv_ids = np.sort(q_ids[:1], axis=-1), np.sort(kv_ids[:1], axis=-1)
                q_ids[0, -3:] = kv_ids[0, -5:] = -1  # padding at the end, after sorting
            s = _segmented(q_len, kv_len, q_chunk, k_chunk, q_ids, kv_ids)
            pairs = [(r, j) for r in range(s.rows.count) for j in range(s.keys.count)]
            by_rows = {r: _looped(s.key_bands(r)) for r in range(s.rows.count)}
            by_keys = {j: _looped(s.row_bands(j)) for j in range(s.keys.count)}
            alone = {r: _looped(s.key_bands(r), True) for r in range(s.rows.count)}
            alone_by_keys = {j: _looped(s.row_bands(j), True) for j in range(s.keys.count)}
            for r, j in pairs:
                one = _one_id(s, q_ids, kv_ids, r, j)
                assert one or (j not in alone[r] and r not in alone_by_keys[j]), (r, j)
                if sort:
                    assert not one or (j in alone[r] and r in alone_by_keys[j]), (r, j)
                one_segment += one
                if _ids_match(s, q_ids, kv_ids, r, j):
                    assert j in by_rows[r] and r in by_keys[j], (r, j)
                elif sort:
                    overlap = _ranges_overlap(s, q_ids, kv_ids, r, j)
                    assert overlap or (j not in by_rows[r] and r not in by_keys[j]), (r, j)
                    skipped += not overlap
    assert skipped > 100 if sort else True
    assert one_segment > 40 if sort else True


def test_packed_documents_skip_to_their_own_blocks():
    """Documents of 16, 16, 16 and 8 tokens, then 8 of padding, in chunks of 8: each block
    sees exactly its document's chunks, without the segment rule; the padding block sees
    none."""
    ids = np.repeat(np.arange(4, dtype=np.int32), 16)[None, :]
    ids[:, 56:] = -1
    s = _segmented(64, 64, 8, 8, ids, ids)
    own = {0: {0, 1}, 1: {0, 1}, 2: {2, 3}, 3: {2, 3}, 4: {4, 5}, 5: {4, 5}, 6: {6}, 7: set()}
    for r in range(8):
        # Documents align with chunks: every pair computed lies inside one document.
        assert _looped(s.key_bands(r)) == own[r] == _looped(s.key_bands(r), True), r
        assert _looped(s.row_bands(r)) == own[r] == _looped(s.row_bands(r), True), r
