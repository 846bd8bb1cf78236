"""Memory-efficient attention (Rabe & Staats 2021), written once against the array API.

Arrays arrive in the canonical layout prepared by :mod:`uniattn._api`::

    q            [*batch, kv_heads, groups, q_len, d_k]   (heads = kv_heads * groups)
    k            [*batch, kv_heads, 1,      kv_len, d_k]
    v            [*batch, kv_heads, 1,      kv_len, d_v]
    bias, mask   same rank as q; every axis either full or 1 (broadcast)

The outer loop runs over query chunks, the inner loop over key chunks. The inner loop
carries, per query row, the running maximum ``m`` of the scores, the running sum ``l`` of
``exp(score - m)`` and the unnormalised output ``acc``; each key chunk rescales them by
``exp(m_old - m_new)``. Only one ``q_chunk x k_chunk`` block of scores per head exists at
a time. Loops, rematerialisation and ``stop_gradient`` come from the backend adapter; the
rest is array-API calls on ``xp``. A length that is not a multiple of its chunk size is
handled by a scan over the full chunks and one static tail chunk, so results are exact
and no key is padded or masked away.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

NEG_INF = float("-inf")


@dataclass(frozen=True)
class Options:
    """Static (hashable) options of one call, after validation."""

    causal: bool
    scale: float
    query_chunk_size: int
    key_chunk_size: int


def forward(backend: Any, q, k, v, bias, mask, options: Options):
    """Attention output ``[*batch, kv_heads, groups, q_len, d_v]`` and its logsumexp.

    The logsumexp ``[*batch, kv_heads, groups, q_len]`` is float32 (float64 for float64
    inputs) and ``-inf`` on rows that see no key; those rows' output is 0.
    """
    xp = backend.namespace()
    device = backend.device(q)
    in_dtype = q.dtype
    acc_dtype = xp.float64 if in_dtype == xp.float64 else xp.float32
    q = xp.astype(q, acc_dtype) * options.scale
    k, v = xp.astype(k, acc_dtype), xp.astype(v, acc_dtype)
    if bias is not None:
        bias = xp.astype(bias, acc_dtype)
    q_len, kv_len = q.shape[-2], k.shape[-2]
    if q_len == 0 or kv_len == 0:
        out = xp.zeros((*q.shape[:-1], v.shape[-1]), dtype=in_dtype, device=device)
        return out, xp.full(q.shape[:-1], NEG_INF, dtype=acc_dtype, device=device)

    cq = min(options.query_chunk_size, q_len)
    ck = min(options.key_chunk_size, kv_len)
    kv_offset = kv_len - q_len  # bottom-right alignment of the causal diagonal

    def update(m, l, acc, q_blk, k_c, v_c, bias_c, mask_c, q_start, k_start):
        """Fold one key chunk into the running (max, sum, accumulator) of a query block."""
        s = xp.matmul(q_blk, xp.matrix_transpose(k_c))
        if bias_c is not None:
            s = s + bias_c
        allowed = mask_c
        if options.causal:
            q_pos = xp.reshape(xp.arange(q_blk.shape[-2], device=device), (-1, 1)) + q_start
            k_pos = xp.reshape(xp.arange(k_c.shape[-2], device=device), (1, -1)) + k_start
            below = k_pos <= q_pos + kv_offset
            allowed = below if allowed is None else xp.logical_and(allowed, below)
        if allowed is not None:
            s = xp.where(allowed, s, NEG_INF)
        # The result does not depend on m, so no gradient needs to flow through it.
        m_new = xp.maximum(m, backend.stop_gradient(xp.max(s, axis=-1, keepdims=True)))
        m_ref = xp.where(m_new == NEG_INF, 0.0, m_new)  # rows that have seen no key yet
        p = xp.exp(s - m_ref)
        rescale = xp.exp(m - m_ref)
        l = l * rescale + xp.sum(p, axis=-1, keepdims=True)
        acc = acc * rescale + xp.matmul(p, v_c)
        return m_new, l, acc

    update = backend.remat(update)
    k_split, v_split = _split(xp, k, -2, ck, kv_len), _split(xp, v, -2, ck, kv_len)
    k_starts = xp.arange(0, kv_len - k_split.tail_len, ck, device=device)

    def query_block(q_blk, q_start, bias_blk, mask_blk, k_chunks, v_chunks, k_tail, v_tail):
        """Output and logsumexp of one block of query rows against every key."""
        rows = q_blk.shape[:-1]
        m = xp.full((*rows, 1), NEG_INF, dtype=acc_dtype, device=device)
        l = xp.zeros((*rows, 1), dtype=acc_dtype, device=device)
        acc = xp.zeros((*rows, v.shape[-1]), dtype=acc_dtype, device=device)
        extras = (_split(xp, bias_blk, -1, ck, kv_len), _split(xp, mask_blk, -1, ck, kv_len))

        def step(carry, xs):
            k_c, v_c, *extra_chunks, k_start = xs
            bias_c, mask_c = _chunk_of(extras, extra_chunks)
            return update(*carry, q_blk, k_c, v_c, bias_c, mask_c, q_start, k_start), None

        xs = (k_chunks, v_chunks, *_stacked(extras), k_starts)
        carry, _ = backend.scan(step, (m, l, acc), xs, k_starts.shape[0])
        if k_tail is not None:
            bias_t, mask_t = _tail_of(extras)
            carry = update(
                *carry, q_blk, k_tail, v_tail, bias_t, mask_t, q_start, k_starts.shape[0] * ck
            )
        m, l, acc = carry
        seen = l != 0.0
        l_safe = xp.where(seen, l, 1.0)
        lse = xp.where(seen, m + xp.log(l_safe), NEG_INF)
        return xp.astype(acc / l_safe, in_dtype), lse[..., 0]

    query_block = backend.remat(query_block)
    key_arrays = (k_split.chunks, v_split.chunks, k_split.tail, v_split.tail)
    queries = tuple(_split(xp, x, -2, cq, q_len) for x in (q, bias, mask))
    q_starts = xp.arange(0, q_len - queries[0].tail_len, cq, device=device)

    def query_step(carry, xs):
        *chunks, q_start = xs
        q_c, bias_c, mask_c = _chunk_of(queries, chunks)
        return carry, query_block(q_c, q_start, bias_c, mask_c, *key_arrays)

    xs = (*_stacked(queries), q_starts)
    _, (out, lse) = backend.scan(query_step, (), xs, q_starts.shape[0])
    out, lse = _merge(xp, out, axis=-2), _merge(xp, lse, axis=-1)
    if queries[0].tail is not None:
        q_t, bias_t, mask_t = _tail_of(queries)
        out_t, lse_t = query_block(q_t, q_starts.shape[0] * cq, bias_t, mask_t, *key_arrays)
        out, lse = xp.concat((out, out_t), axis=-2), xp.concat((lse, lse_t), axis=-1)
    return out, lse


@dataclass(frozen=True)
class _Split:
    """An operand cut along one axis for a scan.

    ``chunks`` stacks the full chunks on a new leading axis, ``tail`` is the shorter last
    chunk (None when the size divides the length). An operand that is None or broadcast
    along the axis (extent 1 where the length is not) is kept whole for every chunk.
    """

    chunks: Any = None
    tail: Any = None
    whole: Any = None
    tail_len: int = 0

    @property
    def is_cut(self) -> bool:
        return self.chunks is not None


def _split(xp, x, axis: int, size: int, length: int) -> _Split:
    """Cut ``x`` along ``axis`` of extent ``length`` (a broadcast extent 1 is not cut)."""
    if x is None or x.shape[axis] != length:
        return _Split(whole=x)
    axis = x.ndim + axis
    cut = length - length % size
    head = _slice_axis(x, axis, 0, cut)
    head = xp.reshape(head, (*x.shape[:axis], cut // size, size, *x.shape[axis + 1 :]))
    chunks = xp.permute_dims(head, (axis, *range(axis), *range(axis + 1, head.ndim)))
    tail = _slice_axis(x, axis, cut, length) if cut < length else None
    return _Split(chunks=chunks, tail=tail, tail_len=length - cut)


def _slice_axis(x, axis: int, start: int, stop: int):
    return x[(slice(None),) * axis + (slice(start, stop),)]


def _stacked(splits) -> tuple:
    """The stacked chunks of the operands that are cut, to scan over."""
    return tuple(s.chunks for s in splits if s.is_cut)


def _chunk_of(splits, chunks) -> tuple:
    """Each operand's value in one scan step, given that step's slices of ``_stacked``."""
    chunks = iter(chunks)
    return tuple(next(chunks) if s.is_cut else s.whole for s in splits)


def _tail_of(splits) -> tuple:
    """Each operand's value for the tail chunk."""
    return tuple(s.tail if s.is_cut else s.whole for s in splits)


def _merge(xp, stacked, axis: int):
    """Inverse of ``_split``'s chunks: ``[count, ..., size, ...] -> [..., count * size, ...]``."""
    pos = stacked.ndim + axis  # the chunk's own axis
    moved = xp.permute_dims(stacked, (*range(1, pos), 0, *range(pos, stacked.ndim)))
    shape = moved.shape
    return xp.reshape(moved, (*shape[: pos - 1], shape[pos - 1] * shape[pos], *shape[pos + 1 :]))
