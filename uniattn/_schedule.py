"""Chunk geometry and the loop schedule of the chunked algorithm.

:mod:`uniattn._algorithm` cuts the query rows into blocks and the keys into chunks, and
visits chunk pairs in two nested loops. This module says how:

- **Geometry** (:class:`Axis`, :func:`split`, :func:`join`). An axis of ``length`` is cut
  into chunks of one static ``size``. When ``size`` does not divide ``length``, the last
  chunk ends at ``length`` and overlaps its predecessor; the algorithm masks the overlapped
  positions out of it, so nothing is padded and every chunk has the same shape.
- **Schedule** (:class:`Schedule`). For a row block, the key chunks it can see (and for a
  key chunk, the row blocks that can see it) under the window (``causal`` is a window with
  ``right = 0``) and the valid lengths, as consecutive :class:`Band` s: partly masked
  chunks at the edges, and between them chunks that every row of the block sees whole,
  which need no structural mask. Chunks outside every band are never computed. Bounds are
  Python ints where they are static or known (an eager framework's lengths and ids, read
  once per call) and 0-d int arrays where they depend on a traced loop index, traced
  lengths or traced ids.
- **Segments**. With segment ids (packed sequences), a chunk pair whose ranges of valid
  ids are disjoint in every batch element is skipped too: the bands are narrowed to the
  chunks between the first and the last one whose ids overlap. For ids that do not
  decrease along the sequence (packed documents) that is exactly the chunks that share a
  document; for any ids it is correct, since the segment rule masks the rest. Chunk pairs
  whose queries and keys all hold one and the same valid id (inside one document) are cut
  into bands of their own that need no segment rule (:attr:`Band.one_segment`).
- **Positions and structural rules** (:meth:`Schedule.positions`, :meth:`Schedule.rules`):
  the absolute positions of a chunk pair and the boolean rules (window, overlaps) that the
  bands say it needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple


@dataclass(frozen=True)
class Axis:
    """One axis cut into :attr:`count` chunks of ``size``; the last one ends at ``length``."""

    length: int
    size: int
    xp: Any = field(compare=False, repr=False, default=None)

    @property
    def count(self) -> int:
        return -(-self.length // self.size)

    @property
    def overlaps(self) -> bool:
        """Whether the last chunk overlaps its predecessor (``size`` does not divide)."""
        return self.length % self.size != 0

    def start(self, index):
        """First position of chunk ``index`` (the last chunk's is pulled back)."""
        start = index * self.size
        return minimum(self.xp, start, self.length - self.size) if self.overlaps else start


@dataclass(frozen=True)
class Split:
    """An operand cut along one axis: ``chunks`` stacks the chunks on a new leading axis.

    An operand that is None, or broadcast along the axis (extent 1 where the length is
    not), is kept ``whole`` for every chunk.
    """

    chunks: Any = None
    whole: Any = None

    def at(self, index):
        """The operand's value in chunk ``index``."""
        return self.whole if self.chunks is None else self.chunks[index, ...]


def split(xp, x, axis: int, cut: Axis) -> Split:
    """Cut ``x`` along ``axis`` into ``cut``'s chunks (a broadcast extent 1 is not cut)."""
    if x is None or x.shape[axis] != cut.length:
        return Split(whole=x)
    axis = x.ndim + axis
    full = cut.length // cut.size * cut.size
    head = _slice_axis(x, axis, 0, full)
    head = xp.reshape(head, (*x.shape[:axis], full // cut.size, cut.size, *x.shape[axis + 1 :]))
    chunks = xp.permute_dims(head, (axis, *range(axis), *range(axis + 1, head.ndim)))
    if cut.overlaps:
        last = _slice_axis(x, axis, cut.length - cut.size, cut.length)
        chunks = xp.concat((chunks, last[None, ...]), axis=0)
    return Split(chunks=chunks)


def join(xp, stacked, axis: int, cut: Axis):
    """Per-chunk results stacked on axis 0, as one array of ``cut.length`` along ``axis``
    (the overlapped start of the last chunk is dropped). None stays None."""
    if stacked is None:
        return None
    pos = stacked.ndim + axis  # the chunk's own axis, once the stacking axis moves next to it
    moved = xp.permute_dims(stacked, (*range(1, pos), 0, *range(pos, stacked.ndim)))
    shape = moved.shape
    merged = xp.reshape(moved, (*shape[: pos - 1], shape[pos - 1] * shape[pos], *shape[pos + 1 :]))
    if not cut.overlaps:
        return merged
    full = (cut.count - 1) * cut.size
    drop = cut.count * cut.size - cut.length
    a = pos - 1
    return xp.concat(
        (_slice_axis(merged, a, 0, full), _slice_axis(merged, a, full + drop, merged.shape[a])),
        axis=a,
    )


def _slice_axis(x, axis: int, start: int, stop: int):
    return x[(slice(None),) * axis + (slice(start, stop), ...)]


def scan_chunks(backend, step: Callable, init, splits: tuple[Split, ...], cut: Axis):
    """``step(carry, index, chunks) -> (carry, y)`` over every chunk of ``cut``, where
    ``chunks`` holds each split operand's value in that chunk; returns the final carry and
    the ys stacked on a new leading axis. A single chunk runs without a loop."""
    if cut.count == 1:
        carry, y = step(init, 0, tuple(s.at(0) for s in splits))
        return carry, _map(lambda a: a[None, ...], y)
    stacked = tuple(s.chunks for s in splits if s.chunks is not None)

    def scan_step(carry, index, xs):
        xs = iter(xs)
        return step(carry, index, tuple(s.whole if s.chunks is None else next(xs) for s in splits))

    return backend.scan(scan_step, init, stacked, cut.count)


def _map(fn, tree):
    return tuple(None if a is None else fn(a) for a in tree) if isinstance(tree, tuple) else tree


@dataclass(frozen=True)
class Band:
    """Chunks ``lower:upper`` of an inner loop, at most ``trips`` of them; ``masked`` says
    whether they need the structural rules (:meth:`Schedule.rules`), ``one_segment``
    that every query and key of each pair holds the same valid segment id, so the
    segment rule is all True there."""

    lower: Any
    upper: Any
    trips: int
    masked: bool
    one_segment: bool = False


class Positions(NamedTuple):
    """Absolute positions of one chunk pair, as int32 arrays.

    ``rows`` ``[q_chunk, 1]`` indexes the block's rows; ``query`` is each row's query
    position (all 0 for folded heads); ``key`` ``[1, k_chunk]`` the keys' positions.
    """

    rows: Any
    query: Any
    key: Any


class Schedule:
    """Which chunk pairs of one call are computed, and which need the structural mask.

    Parameters
    ----------
    xp : array namespace
    q_len, kv_len : int
        Query and key lengths; key ``j`` is visible to query ``i`` iff
        ``i' - left <= j <= i' + right`` with ``i' = i + kv_len - q_len`` (bottom-right).
    rows : int
        Rows of the query operand: ``q_len``, or the query heads of one key/value head
        when a single query position is ``folded`` into rows (every row at position 0).
    query_chunk, key_chunk : int
        Requested chunk sizes, clipped to the lengths.
    left, right : int or None
        The window (None: unbounded on that side).
    q_max, k_max : 0-d int array or None
        The longest valid query and key length of the batch: later chunks are skipped.
    q_ids, kv_ids : int array ``[*batch, q_len]`` and ``[*batch, kv_len]``, or None
        Segment ids (negative: padding), for skipping chunk pairs with disjoint ids.
    q_start, k_start : int or 0-d int array
        The position of the first query and key: a call may compute one block of a longer
        sequence (ring attention), whose window and callables see the sequence's positions.
        ``q_len``/``kv_len``, the chunks, lengths and ids count from the block's start.
    concrete : callable, optional
        ``Backend.concrete_ints``: the bounds that lengths and ids set as Python ints, or
        None where they stay arrays.
    """

    def __init__(
        self,
        xp,
        *,
        q_len: int,
        kv_len: int,
        rows: int,
        folded: bool,
        query_chunk: int,
        key_chunk: int,
        left: int | None,
        right: int | None,
        q_max=None,
        k_max=None,
        q_ids=None,
        kv_ids=None,
        q_start=0,
        k_start=0,
        device=None,
        concrete=None,
    ):
        self.xp, self.device = xp, device
        self.q_start, self.k_start = q_start, k_start
        self.q_len, self.kv_len, self.folded = q_len, kv_len, folded
        self.left, self.right = left, right
        self.offset = kv_len - q_len  # the diagonal's key position at query 0
        # Folded rows are the query heads of one position: always a single block.
        row_chunk = rows if folded else query_chunk
        self.rows = Axis(rows, min(row_chunk, max(rows, 1)), xp)
        self.keys = Axis(kv_len, min(key_chunk, max(kv_len, 1)), xp)
        self.q_max, self.k_max = _known(concrete, q_max), _known(concrete, k_max)
        self.segments = None
        if q_ids is not None:
            bounds = self._segment_bounds(q_ids, kv_ids)
            self.segments = _SegmentBounds(*(_known(concrete, b) for b in bounds))

    def _segment_bounds(self, q_ids, kv_ids) -> _SegmentBounds:
        """Per row block, the key chunks from the first to the last whose valid ids overlap
        the block's; per key chunk, the row blocks likewise."""
        xp = self.xp
        query_blocks = Axis(1, 1, xp) if self.folded else Axis(self.q_len, self.rows.size, xp)
        q_low, q_high, q_one = _id_ranges(xp, q_ids, query_blocks)  # [R, *batch]
        k_low, k_high, k_one = _id_ranges(xp, kv_ids, self.keys)  # [J, *batch]
        overlap = xp.logical_and(
            xp.expand_dims(k_high, axis=0) >= xp.expand_dims(q_low, axis=1),
            xp.expand_dims(k_low, axis=0) <= xp.expand_dims(q_high, axis=1),
        )  # [R, J, *batch]
        if overlap.ndim > 2:
            overlap = xp.any(overlap, axis=tuple(range(2, overlap.ndim)))
        same = xp.logical_and(
            xp.expand_dims(k_one, axis=0) == xp.expand_dims(q_one, axis=1),
            xp.expand_dims(q_one, axis=1) >= 0,
        )  # [R, J, *batch]: one id on both sides
        if same.ndim > 2:
            same = xp.all(same, axis=tuple(range(2, same.ndim)))
        return _SegmentBounds(
            *_first_and_stop(xp, overlap),
            *_first_and_stop(xp, xp.permute_dims(overlap, (1, 0))),
            *_first_and_stop(xp, same, contiguous=True),
            *_first_and_stop(xp, xp.permute_dims(same, (1, 0)), contiguous=True),
        )

    def _narrowed(self, first, stop, index, by_keys: bool):
        """``first:stop`` within the segment bounds of row block (``by_keys``) or key
        chunk ``index``."""
        xp, seg = self.xp, self.segments
        low, high = (seg.key_first, seg.key_stop) if by_keys else (seg.row_first, seg.row_stop)
        first = maximum(xp, first, low[index])
        return first, maximum(xp, minimum(xp, stop, high[index]), first)

    def _by_segment(self, band_list: list[Band], index, by_keys: bool) -> list[Band]:
        """``band_list`` with each band's run of :attr:`Band.one_segment` pairs cut out
        as a band of its own (row block or key chunk ``index``)."""
        if self.segments is None:
            return band_list
        xp, seg = self.xp, self.segments
        firsts, stops = (
            (seg.same_key_first, seg.same_key_stop)
            if by_keys
            else (seg.same_row_first, seg.same_row_stop)
        )
        same_first, same_stop = firsts[index], stops[index]
        cut = []
        for b in band_list:
            first = minimum(xp, maximum(xp, same_first, b.lower), b.upper)
            stop = minimum(xp, maximum(xp, same_stop, first), b.upper)
            cut += [
                Band(b.lower, first, b.trips, b.masked),
                Band(first, stop, b.trips, b.masked, one_segment=True),
                Band(stop, b.upper, b.trips, b.masked),
            ]
        return [b for b in cut if not _same(b.lower, b.upper)]

    # -- positions and rules ---------------------------------------------------------
    def positions(self, r_index, k_index, n_rows: int, n_keys: int) -> Positions:
        """Positions of row block ``r_index`` (``n_rows`` rows) and key chunk ``k_index``."""
        xp = self.xp
        rows = xp.reshape(self._arange(self.rows.start(r_index), n_rows), (-1, 1))
        keys = xp.reshape(
            self._arange(plus(self.k_start, self.keys.start(k_index)), n_keys), (1, -1)
        )
        query = rows * 0 if self.folded else rows
        return Positions(rows, plus(self.q_start, query), keys)

    def needs_rules(self, masked: bool, overlapping_rows: bool) -> bool:
        """Whether :meth:`rules` has any rule for a chunk pair of a band."""
        structural = self.left is not None or self.right is not None or self.keys.overlaps
        return (masked and structural) or (overlapping_rows and self.rows.overlaps)

    def rules(self, pos: Positions, r_index, k_index, masked: bool, overlapping_rows: bool):
        """The structural rules of a chunk pair, as bool arrays (True = attend).

        ``masked`` (the pair is in a masked band): the window and the last key chunk's
        overlap, which belongs to its predecessor. ``overlapping_rows``: the last row
        block's overlap, for sums over rows (the backward), which must not count it twice.
        """
        rules = []
        diagonal = pos.query + self.offset
        if masked and self.right is not None:
            rules.append(pos.key <= diagonal + self.right)
        if masked and self.left is not None:
            rules.append(pos.key >= diagonal - self.left)
        if masked and self.keys.overlaps:
            rules.append(pos.key >= plus(self.k_start, k_index * self.keys.size))
        if overlapping_rows and self.rows.overlaps:
            rules.append(pos.rows >= r_index * self.rows.size)
        return rules

    def _arange(self, start, n):
        return self.xp.arange(n, dtype=self.xp.int32, device=self.device) + start

    # -- bands -----------------------------------------------------------------------
    def key_bands(self, r_index) -> list[Band]:
        """The key chunks row block ``r_index`` can see, as consecutive bands: partly
        masked edges around a middle of chunks that every row sees whole."""
        xp, keys, left, right = self.xp, self.keys, self.left, self.right
        block_first = 0 if self.folded else self.rows.start(r_index)
        # Diagonals of the block's first and last rows, as positions within this call's keys.
        d_first = self.q_start + block_first + self.offset - self.k_start
        d_last = d_first if self.folded else d_first + self.rows.size - 1
        lo, hi = 0, self.kv_len - 1  # inclusive key indices
        if left is not None:
            lo = maximum(xp, lo, d_first - left)
        if right is not None:
            hi = minimum(xp, hi, d_last + right)
        if self.k_max is not None:
            hi = minimum(xp, hi, self.k_max - 1)
        first = minimum(xp, lo // keys.size, keys.count)
        stop = maximum(xp, first, (hi + keys.size) // keys.size)  # empty when hi < lo
        if self.q_max is not None:
            stop = select(xp, block_first < self.q_max, stop, first)
        if self.segments is not None:
            first, stop = self._narrowed(first, stop, r_index, by_keys=True)
        trips = keys.count
        if left is not None and right is not None:
            width = 0 if self.folded else self.rows.size - 1
            trips = min(trips, (width + left + right) // keys.size + 2)
        # Whole chunks: every key at or after the block's last diagonal - left, at or
        # before its first diagonal + right, and not the overlapping last chunk.
        whole_first = None if left is None else _ceil_div(d_last - left, keys.size)
        whole_stop = keys.count - 1 if keys.overlaps else None
        if right is not None:
            below = (d_first + right + 1) // keys.size
            whole_stop = below if whole_stop is None else minimum(xp, whole_stop, below)
        edge_trips = min(keys.count, self.rows.size // keys.size + 2)
        cut = bands(xp, first, stop, whole_first, whole_stop, trips, (edge_trips, edge_trips))
        return self._by_segment(cut, r_index, by_keys=True)

    def row_bands(self, k_index) -> list[Band]:
        """The row blocks that can see key chunk ``k_index``, as :meth:`key_bands`."""
        xp, rows, left, right = self.xp, self.rows, self.left, self.right
        k_first = k_index * self.keys.size  # nominal: the overlap is masked out
        k_last = minimum(xp, k_first + self.keys.size, self.kv_len) - 1
        # The rows whose diagonal is at the chunk's first and last key, as indices within
        # this call's queries.
        shift = self.k_start - self.q_start - self.offset
        r_first, r_last = k_first + shift, k_last + shift
        lo, hi = 0, self.q_len - 1  # inclusive query indices
        if right is not None:
            lo = maximum(xp, lo, r_first - right)
        if left is not None:
            hi = minimum(xp, hi, r_last + left)
        if self.q_max is not None:
            hi = minimum(xp, hi, self.q_max - 1)
        if self.folded:  # every row is at position 0
            first, stop = 0, select(xp, lo <= hi, rows.count, 0)
            stop = select(xp, lo <= 0, stop, 0)
        else:
            first = minimum(xp, lo // rows.size, rows.count)
            stop = maximum(xp, first, (hi + rows.size) // rows.size)
        if self.k_max is not None:
            stop = select(xp, k_first < self.k_max, stop, first)
        if self.segments is not None:
            first, stop = self._narrowed(first, stop, k_index, by_keys=False)
        trips = rows.count
        if left is not None and right is not None and not self.folded:
            trips = min(trips, (self.keys.size - 1 + left + right) // rows.size + 2)
        if self.folded:  # one block of rows: nothing to split
            return self._by_segment([Band(first, stop, trips, masked=True)], k_index, by_keys=False)
        # Whole blocks: every row's window holds the whole chunk; the overlapping last
        # block (its overlap is masked in the backward) and last key chunk are never whole.
        whole_first = None if right is None else _ceil_div(r_last - right, rows.size)
        whole_stop = rows.count - 1 if rows.overlaps else None
        if left is not None:
            above = (r_first + left + 1) // rows.size
            whole_stop = above if whole_stop is None else minimum(xp, whole_stop, above)
        if self.keys.overlaps:
            whole_stop = rows.count if whole_stop is None else whole_stop
            whole_stop = select(xp, k_index < self.keys.count - 1, whole_stop, 0)
        edge_trips = min(rows.count, self.keys.size // rows.size + 2)
        # The overlapping last key chunk has no middle: its tail is all of its rows.
        tail_trips = trips if self.keys.overlaps else edge_trips
        cut = bands(xp, first, stop, whole_first, whole_stop, trips, (edge_trips, tail_trips))
        return self._by_segment(cut, k_index, by_keys=False)


class _SegmentBounds(NamedTuple):
    """First and stop (exclusive) key chunk per row block, and row block per key chunk,
    as int32 arrays ``[R]`` and ``[J]`` (lists of ints where the backend reads them): of
    the chunks whose ids overlap, and of the run of chunks that share the block's one id."""

    key_first: Any
    key_stop: Any
    row_first: Any
    row_stop: Any
    same_key_first: Any
    same_key_stop: Any
    same_row_first: Any
    same_row_stop: Any


_NO_ID = 2**31 - 1  # above every valid id


def _id_ranges(xp, ids, cut: Axis):
    """The smallest and largest valid (non-negative) id of each chunk of ``ids [*batch,
    length]`` along its last axis, and the chunk's one id where all its ids are valid and
    equal (else -1), each ``[count, *batch]``; an all-padding chunk gets an empty range
    (``_NO_ID``, -1)."""
    chunks = split(xp, ids, -1, cut).chunks
    valid = chunks >= 0
    low = xp.min(xp.where(valid, chunks, _NO_ID), axis=-1)
    high = xp.max(xp.where(valid, chunks, -1), axis=-1)
    one = xp.where(xp.logical_and(xp.all(valid, axis=-1), low == high), low, -1)
    return low, high, one


def _known(concrete, bound):
    """``bound`` (an int array or None) as Python ints where ``concrete`` reads them."""
    if bound is None or concrete is None:
        return bound
    values = concrete(bound)
    return bound if values is None else values


def _first_and_stop(xp, overlap, contiguous: bool = False):
    """For each row of a bool ``[A, B]``, the first True column and one past the last
    (both 0 where a row has none), int32. ``contiguous``: a row whose Trues are not one
    run gets none."""
    count = overlap.shape[-1]
    as_int = xp.astype(overlap, xp.int32)
    seen = xp.any(overlap, axis=-1)
    first = xp.astype(xp.argmax(as_int, axis=-1), xp.int32)
    stop = count - xp.astype(xp.argmax(xp.flip(as_int, axis=-1), axis=-1), xp.int32)
    if contiguous:
        seen = xp.logical_and(seen, xp.sum(as_int, axis=-1, dtype=xp.int32) == stop - first)
    return xp.where(seen, first, 0), xp.where(seen, stop, 0)


def bands(xp, first, stop, whole_first, whole_stop, trips, edge_trips) -> list[Band]:
    """``first:stop`` cut into a masked head, a whole middle ``whole_first:whole_stop``
    (clipped to ``first:stop``) and a masked tail; None for either bound: no head, no tail.
    ``trips`` bounds the middle's length, ``edge_trips`` the head's and the tail's. Bands
    known to be empty are left out."""
    mid_first = first if whole_first is None else minimum(xp, maximum(xp, whole_first, first), stop)
    mid_stop = stop if whole_stop is None else minimum(xp, maximum(xp, whole_stop, mid_first), stop)
    candidates = [
        Band(first, mid_first, edge_trips[0], masked=True),
        Band(mid_first, mid_stop, trips, masked=False),
        Band(mid_stop, stop, edge_trips[1], masked=True),
    ]
    return [b for b in candidates if not _same(b.lower, b.upper)]


def plus(start, x):
    """``start + x``, with no operation for the usual start 0."""
    return x if isinstance(start, int) and start == 0 else start + x


def _same(a, b) -> bool:
    """Whether two loop bounds are known to be equal without evaluating an array."""
    return a is b or (isinstance(a, int) and isinstance(b, int) and a == b)


def _ceil_div(a, b: int):
    return -(-a // b)


# Bounds are Python ints where they are static and 0-d int arrays where they are traced or
# come from the lengths; these keep ints as ints.
def minimum(xp, a, b):
    """``min(a, b)`` of two bounds."""
    if isinstance(a, int) and isinstance(b, int):
        return min(a, b)
    a, b = (b, a) if isinstance(a, int) else (a, b)
    return xp.clip(a, max=b) if isinstance(b, int) else xp.minimum(a, b)


def maximum(xp, a, b):
    """``max(a, b)`` of two bounds."""
    if isinstance(a, int) and isinstance(b, int):
        return max(a, b)
    a, b = (b, a) if isinstance(a, int) else (a, b)
    return xp.clip(a, min=b) if isinstance(b, int) else xp.maximum(a, b)


def select(xp, condition, a, b):
    """``a if condition else b`` of two bounds; ``condition`` a bool or 0-d bool array."""
    if isinstance(condition, bool):
        return a if condition else b
    if isinstance(a, int) and isinstance(b, int):  # where() takes at most one Python scalar
        return xp.astype(condition, xp.int32) * (a - b) + b
    return xp.where(condition, a, b)
