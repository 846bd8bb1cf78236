"""Ring attention: one sequence sharded over the devices of a ring, from the chunk algorithm.

Each of ``P`` ranks holds one shard of the queries, keys and values along the sequence.
The keys and values travel around the ring (the adapter's :class:`~uniattn.backends.Ring`):
at step ``t`` a rank holds the shard of rank ``rank - t`` and computes its queries against
it with :func:`uniattn._algorithm.forward`, given the sequence positions of both, while the
next shard is already on its way. The blocks' ``(out, lse)`` pairs are merged exactly as the
inner loop merges key chunks (:func:`merge_parts`); sinks join the merged normaliser once.

The backward is a second ring. :func:`uniattn._algorithm.backward`, given the merged output
and logsumexp, returns each block's share of dQ, dK and dV; dK and dV travel with their
keys and values and arrive home after ``P`` steps.

Shardings: "contiguous" gives rank ``r`` positions ``[r n, (r + 1) n)`` (``n`` per rank);
"zigzag" cuts the sequence into ``2P`` pieces and gives rank ``r`` pieces ``r`` and
``2P - 1 - r``, so that with causal attention every rank does the same work. A rank's
shard is one or two contiguous runs of positions ("segments" below), and a block is
computed per pair of segments, so the schedule skips the chunk pairs no query can see.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from . import _algorithm
from ._api import _DEFAULTS
from ._arguments import canonical_arrays, from_canonical, lse_shape, parse, unpack
from ._dispatch import backend_of, type_name
from ._schedule import Schedule

SHARDINGS = ("contiguous", "zigzag")
NEG_INF = float("-inf")


class Segment(NamedTuple):
    """``length`` positions of a shard, local ``offset``, starting at sequence ``start``."""

    offset: int
    length: int
    start: Any  # int, or a 0-d int array where the rank is traced


def segments(sharding: str, rank, size: int, n: int) -> list[Segment]:
    """The runs of sequence positions that rank ``rank`` of ``size`` holds, ``n`` in all."""
    if sharding == "contiguous":
        return [Segment(0, n, rank * n)]
    half = n // 2
    return [Segment(0, half, rank * half), Segment(half, half, (2 * size - 1 - rank) * half)]


# -- the ring -------------------------------------------------------------------------------
def ring_attention(
    query: Any,
    key: Any,
    value: Any,
    *,
    axis_name: Any = None,
    group: Any = None,
    sharding: str = "contiguous",
    causal: bool | str = False,
    window: tuple[int | None, int | None] | None = None,
    segment_ids: Any = None,
    sinks: Any = None,
    softcap: float | None = None,
    bias: Any = None,
    mask: Any = None,
    scale: float | None = None,
    layout: str = "BTHD",
    query_chunk_size: int | None = None,
    key_chunk_size: int | None = None,
    return_lse: bool = False,
) -> Any:
    """Attention over a sequence sharded along its length over the ranks of a ring.

    Every rank calls it with its own shard of ``query``, ``key`` and ``value`` (and of
    ``segment_ids``); the result on each rank is exactly the matching rows of
    :func:`uniattn.attention` on the whole sequence, values, logsumexp and gradients. Keys
    and values (only the key/value heads) travel around the ring, each sent before the
    block that uses the previous one is computed; no rank ever holds all of them, and each
    holds its shard plus one chunk of scores per head.

    Parameters
    ----------
    query, key, value : arrays
        This rank's shards, as for :func:`uniattn.attention`, with the same length for the
        queries and the keys (one sequence) and the same on every rank.
    axis_name : hashable, optional
        JAX: the mesh axis of ``jax.shard_map`` that the sequence is sharded over.
    group : torch.distributed.ProcessGroup, optional
        PyTorch: the process group of the ring (None: the default group).
    sharding : {"contiguous", "zigzag"}
        How the sequence was cut (:func:`zigzag` prepares a zigzag-sharded sequence).
    causal, window, segment_ids, sinks, softcap, scale, layout, query_chunk_size,
    key_chunk_size, return_lse
        As for :func:`uniattn.attention`, in sequence positions.
    bias, mask : callable, optional
        Called with ``(q_idx, k_idx)`` sequence positions; arrays are not accepted (a rank
        holds only its own rows of one).

    Returns
    -------
    out : array
        This rank's rows of the output, shaped like ``query`` (``d_v`` last).
    lse : array ``[*batch, heads, q_len]``
        With ``return_lse=True``.

    Raises
    ------
    NotImplementedError
        On a framework without a ring (NumPy, TensorFlow).
    """
    for name, x in (("bias", bias), ("mask", mask)):
        if x is not None and not callable(x):
            raise TypeError(
                f"ring_attention takes {name} only as a callable {name}(q_idx, k_idx) of "
                f"sequence positions: each rank holds only its own shard, and an array "
                f"{name} would have to cover the whole sequence; got {type_name(x)}"
            )
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be one of {SHARDINGS}; got {sharding!r}")
    ring_keywords = {
        "bias": bias,
        "mask": mask,
        "causal": causal,
        "window": window,
        "segment_ids": segment_ids,
        "sinks": sinks,
        "softcap": softcap,
        "scale": scale,
        "layout": layout,
        "query_chunk_size": query_chunk_size,
        "key_chunk_size": key_chunk_size,
        "return_lse": return_lse,
        "implementation": "chunked",  # every block is the chunk algorithm's
    }
    keywords = {**_DEFAULTS, **ring_keywords}  # no lengths, no dropout, the custom backward
    call = parse(query, key, value, keywords)
    backend = call.backend
    q_len, heads, _ = unpack(call.arrays.q.shape, layout)
    kv_len = unpack(call.arrays.k.shape, layout)[0]
    if q_len != kv_len:
        raise ValueError(
            f"ring_attention computes one sequence: the query and key shards must have the "
            f"same length along the sequence axis; got {q_len} and {kv_len} ({layout})"
        )
    if sharding == "zigzag" and q_len % 2:
        raise ValueError(
            f"sharding='zigzag' holds two equal pieces per rank: the shard length must be "
            f"even; got {q_len}"
        )
    ring = backend.ring(axis_name=axis_name, group=group)
    ring.check_same_length(q_len)
    xp = backend.namespace()
    ops = canonical_arrays(xp, layout, call.arrays)
    plan = _Plan(backend, ring, call.options, sharding, q_len)
    args = (ops.q, ops.k, ops.v, ops.q_ids, ops.kv_ids, ops.sinks)
    out, lse = backend.custom_vjp(plan.forward, plan.backward)(*args)
    out = from_canonical(xp, layout, out, heads)
    return call.result(out, xp.reshape(lse, lse_shape(call.arrays.q, layout)))


class _Plan:
    """The forward and backward rings of one call."""

    def __init__(self, backend, ring, options, sharding: str, n: int):
        self.backend, self.ring, self.options = backend, ring, options
        self.xp = backend.namespace()
        self.sharding, self.n = sharding, n

    @property
    def own(self) -> list[Segment]:
        """The segments of this rank's queries (read in each trace that uses them)."""
        return segments(self.sharding, self.ring.rank, self.ring.size, self.n)

    def held(self, step: int) -> list[Segment]:
        """The segments of the keys held at ``step``: those of rank ``rank - step``."""
        return segments(
            self.sharding, (self.ring.rank - step) % self.ring.size, self.ring.size, self.n
        )

    def forward(self, q, k, v, q_ids, kv_ids, sinks):
        xp, ring, own = self.xp, self.ring, self.own
        parts = [[] for _ in own]
        held = (k, v, kv_ids)
        for step in range(ring.size):
            receive = ring.shift(held) if step < ring.size - 1 else None
            for (i, a), b in ((ia, b) for ia in enumerate(own) for b in self.held(step)):
                ops = _algorithm.Operands(
                    _cut(q, a, -2),
                    _cut(held[0], b, -2),
                    _cut(held[1], b, -2),
                    q_ids=_cut(q_ids, a, -2),
                    kv_ids=_cut(held[2], b, -1),
                )
                parts[i].append(
                    _algorithm.forward(
                        self.backend,
                        ops,
                        options=self.options,
                        remat=False,
                        starts=(a.start, b.start),
                    )
                )
            if receive is not None:
                held = receive()
        merged = [merge_parts(xp, p) for p in parts]
        out = xp.concat([o for o, _ in merged], axis=-2)
        lse = xp.concat([s for _, s in merged], axis=-1)
        if sinks is not None:
            out, lse = _algorithm.join_sinks(xp, out, lse[..., None], xp.astype(sinks, lse.dtype))
            lse = lse[..., 0]
        return (out, lse), (q, k, v, q_ids, kv_ids, sinks, out, lse)

    def backward(self, residuals, cotangents):
        xp, ring, backend = self.xp, self.ring, self.backend
        q, k, v, q_ids, kv_ids, sinks, out, lse = residuals
        d_out, d_lse = cotangents
        acc = out.dtype
        lift = lambda x: xp.astype(x, acc, copy=False)  # noqa: E731
        # dk and dv are summed over every rank's queries: accumulated unrounded.
        own = self.own
        dq_parts = [None] * len(own)
        held, d_held, receive_d = (k, v, kv_ids), None, None
        for step in range(ring.size):
            receive = ring.shift(held) if step < ring.size - 1 else None
            keys = self.held(step)
            dk_parts, dv_parts = [None] * len(keys), [None] * len(keys)
            for i, a in enumerate(own):
                for j, b in enumerate(keys):
                    ops = _algorithm.Operands(
                        lift(_cut(q, a, -2)),
                        lift(_cut(held[0], b, -2)),
                        lift(_cut(held[1], b, -2)),
                        q_ids=_cut(q_ids, a, -2),
                        kv_ids=_cut(held[2], b, -1),
                    )
                    dq, dk, dv, _, _ = _algorithm.backward(
                        backend,
                        ops,
                        _cut(out, a, -2),
                        _cut(lse, a, -1),
                        _cut(d_out, a, -2),
                        None if d_lse is None else _cut(d_lse, a, -1),
                        options=self.options,
                        starts=(a.start, b.start),
                    )
                    dq_parts[i] = _add(dq_parts[i], dq)
                    dk_parts[j], dv_parts[j] = _add(dk_parts[j], dk), _add(dv_parts[j], dv)
            d_block = (xp.concat(dk_parts, axis=-2), xp.concat(dv_parts, axis=-2))
            if receive_d is not None:  # the held keys' gradients from the ranks before
                d_held = receive_d()
                d_block = (d_held[0] + d_block[0], d_held[1] + d_block[1])
            receive_d = ring.shift(d_block)  # to the rank that holds these keys next
            if receive is not None:
                held = receive()
        dk, dv = receive_d()  # after ``size`` steps: this rank's own keys
        dq = xp.concat(dq_parts, axis=-2)
        d_sinks = None
        if sinks is not None:  # this rank's rows' share, summed over every rank's rows
            delta = xp.vecdot(lift(d_out), out)[..., None]
            if d_lse is not None:
                delta = delta - lift(d_lse)[..., None]
            d_sinks = _algorithm.sink_cotangent(xp, lift(sinks), lse[..., None], delta)
            d_sinks = xp.astype(ring.sum_replicated(d_sinks), sinks.dtype)
        grads = tuple(xp.astype(g, x.dtype) for g, x in ((dq, q), (dk, k), (dv, v)))
        return (*grads, None, None, d_sinks)


def _cut(x, segment: Segment, axis: int):
    """The positions of ``segment`` of ``x`` along ``axis`` (-1 or -2); None stays None."""
    if x is None:
        return None
    if segment.offset == 0 and segment.length == x.shape[axis]:
        return x
    index = slice(segment.offset, segment.offset + segment.length)
    return x[..., index] if axis == -1 else x[..., index, :]


def _add(total, x):
    return x if total is None else total + x


# -- merging ------------------------------------------------------------------------------
def merge_parts(xp, parts):
    """Merge ``(out [.., rows, d], lse [.., rows])`` pairs over disjoint key sets, in the
    accumulation dtype; rows no part sees keep lse ``-inf`` and output 0."""
    if len(parts) == 1:
        return parts[0]
    lses = [s for _, s in parts]
    top = lses[0]
    for s in lses[1:]:
        top = xp.maximum(top, s)
    top = xp.where(top == NEG_INF, 0.0, top)  # rows no part sees: weights exp(-inf) = 0
    weights = [xp.exp(s - top) for s in lses]
    total = weights[0]
    for w in weights[1:]:
        total = total + w
    seen = total > 0.0
    safe = xp.where(seen, total, 1.0)
    out = parts[0][0] * (weights[0] / safe)[..., None]
    for (o, _), w in zip(parts[1:], weights[1:], strict=True):
        out = out + o * (w / safe)[..., None]
    return out, xp.where(seen, top + xp.log(safe), NEG_INF)


def merge(*parts: tuple[Any, Any], layout: str = "BTHD") -> tuple[Any, Any]:
    """Merge attention results over disjoint sets of keys into the result over their union.

    Parameters
    ----------
    *parts : (out, lse) pairs
        Each as :func:`uniattn.attention` returns with ``return_lse=True`` for the same
        queries and a different set of keys: ``out`` in ``layout``, ``lse`` ``[*batch,
        heads, q_len]``. Any framework's arrays, all the same.
    layout : {"BTHD", "BHTD"}
        The layout of every ``out``.

    Returns
    -------
    (out, lse)
        Attention over every part's keys; ``out`` in the parts' dtype. Differentiable
        with the framework's autodiff. Rows no part sees keep output 0 and lse ``-inf``.
    """
    if not parts:
        raise ValueError("merge needs at least one (out, lse) pair; got none")
    if layout not in ("BTHD", "BHTD"):
        raise ValueError(f"layout must be 'BTHD' or 'BHTD'; got {layout!r}")
    for i, part in enumerate(parts):
        if not isinstance(part, tuple | list) or len(part) != 2:
            raise TypeError(f"merge takes (out, lse) pairs; part {i} is {type_name(part)}")
    named = {f"parts[{i}][{j}]": x for i, p in enumerate(parts) for j, x in enumerate(p)}
    backend = backend_of(**named)
    xp = backend.namespace()
    out0 = parts[0][0]
    expected = lse_shape(out0, layout)
    for i, (out, lse) in enumerate(parts):
        if tuple(out.shape) != tuple(out0.shape) or tuple(lse.shape) != expected:
            raise ValueError(
                f"merge: every part must have out of shape {tuple(out0.shape)} and lse of "
                f"shape {expected} ([*batch, heads, q_len]); part {i} has "
                f"{tuple(out.shape)} and {tuple(lse.shape)}"
            )
    acc = xp.float64 if out0.dtype == xp.float64 else xp.float32

    def rows_last(out):  # [*batch, heads, q_len, d]
        out = xp.astype(out, acc, copy=False)
        return (
            xp.permute_dims(out, (*range(out.ndim - 3), out.ndim - 2, out.ndim - 3, out.ndim - 1))
            if layout == "BTHD"
            else out
        )

    merged, lse = merge_parts(xp, [(rows_last(o), xp.astype(s, acc, copy=False)) for o, s in parts])
    out = rows_last(merged) if layout == "BTHD" else merged
    return xp.astype(out, out0.dtype, copy=False), lse


# -- zigzag -------------------------------------------------------------------------------
def _zigzag_order(shards: int) -> list[int]:
    """Piece order of a zigzag sequence: rank r's pieces r and 2 shards - 1 - r, in turn."""
    return [p for r in range(shards) for p in (r, 2 * shards - 1 - r)]


def _permuted(x, shards, axis, inverse: bool, name: str):
    backend = backend_of(x=x)
    xp = backend.namespace()
    if not isinstance(shards, int) or isinstance(shards, bool) or shards < 1:
        raise ValueError(f"{name}: shards must be a positive int; got {shards!r}")
    if not isinstance(axis, int) or isinstance(axis, bool) or not -x.ndim <= axis < x.ndim:
        raise ValueError(f"{name}: axis must be an int in [-{x.ndim}, {x.ndim}); got {axis!r}")
    axis %= x.ndim
    length = x.shape[axis]
    if length % (2 * shards):
        raise ValueError(
            f"{name}: the length along axis {axis} must be a multiple of 2 * shards = "
            f"{2 * shards}; got {length}"
        )
    piece = length // (2 * shards)
    order = _zigzag_order(shards)
    if inverse:
        order = sorted(range(len(order)), key=order.__getitem__)
    lead = (slice(None),) * axis
    return xp.concat([x[(*lead, slice(p * piece, (p + 1) * piece))] for p in order], axis=axis)


def zigzag(x: Any, shards: int, axis: int) -> Any:
    """``x`` permuted along ``axis`` so that cutting it into ``shards`` equal contiguous
    shards gives each rank its zigzag shard (pieces ``r`` and ``2 shards - 1 - r`` of
    ``2 shards``). Any framework's array; the length must be a multiple of ``2 shards``."""
    return _permuted(x, shards, axis, False, "zigzag")


def unzigzag(x: Any, shards: int, axis: int) -> Any:
    """The inverse of :func:`zigzag`."""
    return _permuted(x, shards, axis, True, "unzigzag")


# -- work -----------------------------------------------------------------------------------
def scores_computed(
    rank: int,
    size: int,
    n: int,
    *,
    sharding: str = "contiguous",
    causal: bool = False,
    window: tuple[int | None, int | None] | None = None,
    chunk: int = 512,
) -> int:
    """How many query-key scores rank ``rank`` of ``size`` computes in the forward ring
    over ``n`` positions per rank: the area of the chunk pairs the ring's own schedule
    computes (zigzag's pieces are half a shard, so its chunks may be smaller)."""
    import numpy as np

    left, right = (None, 0) if causal else (None, None)
    if window is not None:
        left = window[0]
        right = window[1] if right is None or window[1] is None else min(right, window[1])
    total = 0
    for step in range(size):
        src = (rank - step) % size
        for a in segments(sharding, rank, size, n):
            for b in segments(sharding, src, size, n):
                schedule = Schedule(
                    np,
                    q_len=a.length,
                    kv_len=b.length,
                    rows=a.length,
                    folded=False,
                    query_chunk=chunk,
                    key_chunk=chunk,
                    left=left,
                    right=right,
                    q_start=a.start,
                    k_start=b.start,
                )
                block = schedule.rows.size * schedule.keys.size
                for r in range(schedule.rows.count):
                    bands = schedule.key_bands(r)
                    total += block * sum(int(band.upper) - int(band.lower) for band in bands)
    return total
