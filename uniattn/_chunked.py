"""Memory-efficient attention (Rabe & Staats 2021), written once against the array API.

Arrays arrive in the canonical layout prepared by :mod:`uniattn._api`::

    q            [*batch, kv_heads, groups, q_len, d_k]   (heads = kv_heads * groups)
    k            [*batch, kv_heads, 1,      kv_len, d_k]
    v            [*batch, kv_heads, 1,      kv_len, d_v]
    bias, mask   same rank as q; every axis either full or 1 (broadcast)

**Forward** (:func:`forward`): the outer loop runs over query chunks, the inner loop over
key chunks. The inner loop carries, per query row, the running maximum ``m`` of the
scores, the running sum ``l`` of ``exp(score - m)`` and the unnormalised output ``acc``;
each key chunk rescales them by ``exp(m_old - m_new)``. It returns the output and the
per-row logsumexp ``m + log(l)``.

**Backward** (:func:`backward`, FlashAttention-2 §3.2): from the output ``O`` and the
logsumexp alone, recompute each chunk's probabilities ``P = exp(S - lse)``; with
``Δ = rowsum(dO ∘ O)``, ``dV += Pᵀ dO``, ``dS = P ∘ (dO Vᵀ - Δ)``, ``dQ += dS K``,
``dK += dSᵀ Q`` and ``d_bias = dS``. The outer loop runs over key chunks (dK, dV in the
inner carry); each key chunk's dQ leaves the inner loop as stacked outputs and is added
to a dQ carried by the outer loop, so nothing is written in place.

Only one ``q_chunk x k_chunk`` block of scores per head exists at a time. Loops,
rematerialisation and ``stop_gradient`` come from the backend adapter; the rest is
array-API calls on ``xp``. A length that its chunk size does not divide is handled by a
scan over the full chunks and one static tail chunk: exact, nothing padded.
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


class _Context:
    """What every chunk of one call shares: namespace, dtypes, lengths and the mask rule."""

    def __init__(self, backend, q, k, options: Options):
        self.backend, self.options = backend, options
        self.xp = xp = backend.namespace()
        self.device = backend.device(q)
        self.in_dtype = q.dtype
        self.acc_dtype = xp.float64 if q.dtype == xp.float64 else xp.float32
        self.q_len, self.kv_len = q.shape[-2], k.shape[-2]
        self.cq = min(options.query_chunk_size, max(self.q_len, 1))
        self.ck = min(options.key_chunk_size, max(self.kv_len, 1))

    def lift(self, x):
        """``x`` in the accumulation dtype (float32, or float64 for float64 inputs)."""
        return None if x is None else self.xp.astype(x, self.acc_dtype)

    def zeros(self, shape):
        return self.xp.zeros(shape, dtype=self.acc_dtype, device=self.device)

    def scores(self, q_c, kt_c, bias_c, mask_c, q_start, k_start):
        """Scaled scores of a chunk pair, -inf where not attended.

        ``q_c`` is pre-scaled and the keys come transposed (``kt_c``: ``[.., d_k, k_chunk]``):
        transposing once outside the loops spares XLA a transpose copy in every step.
        """
        xp = self.xp
        s = xp.matmul(q_c, kt_c)
        if bias_c is not None:
            s = s + bias_c
        allowed = mask_c
        if self.options.causal:  # j <= i + kv_len - q_len: bottom-right aligned
            i = xp.reshape(xp.arange(q_c.shape[-2], device=self.device), (-1, 1)) + q_start
            j = xp.reshape(xp.arange(kt_c.shape[-1], device=self.device), (1, -1)) + k_start
            below = j <= i + (self.kv_len - self.q_len)
            allowed = below if allowed is None else xp.logical_and(allowed, below)
        return s if allowed is None else xp.where(allowed, s, NEG_INF)

    def loop(self, step, init, splits, axis_len):
        """Run ``step(carry, chunks, start) -> (carry, y)`` over the chunks of ``splits``.

        The full chunks go through the backend's ``scan``, the tail (if any) through one
        more call of ``step``. Returns ``(carry, stacked ys, tail y or None)``.
        """
        size = self.cq if axis_len == "q" else self.ck
        length = self.q_len if axis_len == "q" else self.kv_len
        count = length // size
        starts = self.xp.arange(0, count * size, size, device=self.device)

        def scan_step(carry, xs):
            return step(carry, _chunk_of(splits, iter(xs[:-1])), xs[-1])

        carry, ys = self.backend.scan(scan_step, init, (*_stacked(splits), starts), count)
        tail = None
        if length % size:
            carry, tail = step(carry, _tail_of(splits), count * size)
        return carry, ys, tail


def forward(backend: Any, q, k, v, bias, mask, options: Options, remat: bool = True):
    """Attention output ``[*batch, kv_heads, groups, q_len, d_v]`` and its logsumexp.

    The logsumexp ``[*batch, kv_heads, groups, q_len]`` is float32 (float64 for float64
    inputs) and ``-inf`` on rows that see no key; those rows' output is 0. With ``remat``
    the chunk computations are rematerialised when the framework differentiates them.
    """
    c = _Context(backend, q, k, options)
    xp = c.xp
    q = c.lift(q) * options.scale
    k, v, bias = c.lift(k), c.lift(v), c.lift(bias)
    if c.q_len == 0 or c.kv_len == 0:
        out = xp.zeros((*q.shape[:-1], v.shape[-1]), dtype=c.in_dtype, device=c.device)
        return out, xp.full(q.shape[:-1], NEG_INF, dtype=c.acc_dtype, device=c.device)

    def update(m, l, acc, q_c, kt_c, v_c, bias_c, mask_c, q_start, k_start):
        """Fold one key chunk into the running (max, sum, accumulator) of a query block."""
        s = c.scores(q_c, kt_c, bias_c, mask_c, q_start, k_start)
        # The result does not depend on m, so no gradient needs to flow through it.
        m_new = xp.maximum(m, backend.stop_gradient(xp.max(s, axis=-1, keepdims=True)))
        m_ref = xp.where(m_new == NEG_INF, 0.0, m_new)  # rows that have seen no key yet
        p = xp.exp(s - m_ref)
        rescale = xp.exp(m - m_ref)
        l = l * rescale + xp.sum(p, axis=-1, keepdims=True)
        acc = acc * rescale + xp.matmul(p, v_c)
        return m_new, l, acc

    def query_block(q_c, bias_c, mask_c, q_start, kt_chunks, v_chunks, kt_tail, v_tail):
        """Output and logsumexp of one block of query rows against every key."""
        rows = q_c.shape[:-1]
        init = (
            xp.full((*rows, 1), NEG_INF, dtype=c.acc_dtype, device=c.device),
            c.zeros((*rows, 1)),
            c.zeros((*rows, v.shape[-1])),
        )
        splits = (
            _Split(kt_chunks, kt_tail),
            _Split(v_chunks, v_tail),
            _split(xp, bias_c, -1, c.ck, c.kv_len),
            _split(xp, mask_c, -1, c.ck, c.kv_len),
        )

        def step(carry, chunks, k_start):
            kt_c, v_c, bias_kc, mask_kc = chunks
            return update(*carry, q_c, kt_c, v_c, bias_kc, mask_kc, q_start, k_start), None

        (m, l, acc), _, _ = c.loop(step, init, splits, "k")
        seen = l != 0.0
        l_safe = xp.where(seen, l, 1.0)
        lse = xp.where(seen, m + xp.log(l_safe), NEG_INF)
        return xp.astype(acc / l_safe, c.in_dtype), lse[..., 0]

    if remat:
        update, query_block = backend.remat(update), backend.remat(query_block)
    kt_split = _split(xp, xp.matrix_transpose(k), -1, c.ck, c.kv_len)
    v_split = _split(xp, v, -2, c.ck, c.kv_len)
    key_arrays = (kt_split.chunks, v_split.chunks, kt_split.tail, v_split.tail)

    def step(carry, chunks, q_start):
        return carry, query_block(*chunks, q_start, *key_arrays)

    splits = tuple(_split(xp, x, -2, c.cq, c.q_len) for x in (q, bias, mask))
    _, ys, tail = c.loop(step, (), splits, "q")
    tail = tail or (None, None)
    return _join(xp, ys[0], tail[0], -2), _join(xp, ys[1], tail[1], -1)


def backward(backend: Any, q, k, v, bias, mask, out, lse, d_out, d_lse, options: Options):
    """Cotangents ``(dq, dk, dv, d_bias)`` of :func:`forward`'s ``(out, lse)``.

    ``d_lse`` may be None. Each cotangent has its primal's shape and dtype; ``d_bias`` is
    None without a bias. Rows that see no key get zero gradients.
    """
    c = _Context(backend, q, k, options)
    xp = c.xp
    dtypes = (q.dtype, k.dtype, v.dtype, None if bias is None else bias.dtype)
    q = c.lift(q) * options.scale
    k, v, bias, d_out = c.lift(k), c.lift(v), c.lift(bias), c.lift(d_out)
    if c.q_len == 0 or c.kv_len == 0:
        grads = (
            c.zeros(q.shape),
            c.zeros(k.shape),
            c.zeros(v.shape),
            None if bias is None else c.zeros(bias.shape),
        )
        return _cast_all(xp, grads, dtypes)

    delta = xp.sum(d_out * c.lift(out), axis=-1, keepdims=True)  # Δ = rowsum(dO ∘ O)
    if d_lse is not None:  # d lse / d S = P, so d_lse joins Δ
        delta = delta - xp.reshape(c.lift(d_lse), delta.shape)
    lse = xp.reshape(xp.where(lse == NEG_INF, 0.0, lse), delta.shape)  # no key: P = 0

    def chunk_grads(
        q_c, qt_c, do_c, dot_c, lse_c, delta_c, bias_c, mask_c, q_start, k_c, kt_c, vt_c, k_start
    ):
        """dQ of a chunk pair, and its transposed contributions dKᵀ = Qᵀ dS, dVᵀ = dOᵀ P.

        Every operand comes in the orientation its product needs (transposed once, outside
        the loops), so no ``q_chunk x k_chunk`` block is ever transposed.
        """
        p = xp.exp(c.scores(q_c, kt_c, bias_c, mask_c, q_start, k_start) - lse_c)
        ds = p * (xp.matmul(do_c, vt_c) - delta_c)
        dkt = _sum_groups(xp, xp.matmul(qt_c, ds))
        dvt = _sum_groups(xp, xp.matmul(dot_c, p))
        db = None if bias_c is None else _sum_to(xp, ds, bias_c.shape)
        return xp.matmul(ds, k_c), dkt, dvt, db

    t = xp.matrix_transpose
    queries = (
        _split(xp, q, -2, c.cq, c.q_len),
        _split(xp, t(q), -1, c.cq, c.q_len),
        _split(xp, d_out, -2, c.cq, c.q_len),
        _split(xp, t(d_out), -1, c.cq, c.q_len),
        _split(xp, lse, -2, c.cq, c.q_len),
        _split(xp, delta, -2, c.cq, c.q_len),
    )

    def key_block(k_c, kt_c, vt_c, bias_k, mask_k, k_start):
        """dK, dV of one key chunk; its contributions to dQ and d_bias over all queries."""
        extras = (_split(xp, bias_k, -2, c.cq, c.q_len), _split(xp, mask_k, -2, c.cq, c.q_len))
        bias_sums_q = bias_k is not None and not extras[0].is_cut  # bias broadcast over q

        def step(carry, chunks, q_start):
            dq, dkt, dvt, db = chunk_grads(*chunks, q_start, k_c, kt_c, vt_c, k_start)
            dkt_acc, dvt_acc, db_acc = carry
            carry = (dkt_acc + dkt, dvt_acc + dvt, db_acc + db if bias_sums_q else None)
            return carry, (dq, None if bias_sums_q else db)

        init = (
            c.zeros(kt_c.shape),
            c.zeros(vt_c.shape),
            c.zeros(bias_k.shape) if bias_sums_q else None,
        )
        (dkt, dvt, db_sum), ys, tail = c.loop(step, init, queries + extras, "q")
        tail = tail or (None, None)
        db = db_sum if bias_sums_q else _join(xp, ys[1], tail[1], -2)
        return t(dkt), t(dvt), _join(xp, ys[0], tail[0], -2), db

    bias_sums_k = bias is not None and bias.shape[-1] != c.kv_len  # bias broadcast over keys

    def step(carry, chunks, k_start):
        dq_acc, db_acc = carry
        dk, dv, dq, db = key_block(*chunks, k_start)
        carry = (dq_acc + dq, db_acc + db if bias_sums_k else None)
        return carry, (dk, dv, None if bias_sums_k else db)

    splits = (
        _split(xp, k, -2, c.ck, c.kv_len),
        _split(xp, t(k), -1, c.ck, c.kv_len),
        _split(xp, t(v), -1, c.ck, c.kv_len),
        _split(xp, bias, -1, c.ck, c.kv_len),
        _split(xp, mask, -1, c.ck, c.kv_len),
    )
    init = (c.zeros(q.shape), c.zeros(bias.shape) if bias_sums_k else None)
    (dq, db_sum), ys, tail = c.loop(step, init, splits, "k")
    tail = tail or (None, None, None)
    dk, dv = _join(xp, ys[0], tail[0], -2), _join(xp, ys[1], tail[1], -2)
    db = db_sum if bias_sums_k else _join(xp, ys[2], tail[2], -1)
    return _cast_all(xp, (dq * options.scale, dk, dv, db), dtypes)


def differentiable(backend: Any, has_bias: bool, has_mask: bool, forward, backward):
    """``f(q, k, v[, bias][, mask]) -> (out, lse)`` whose gradient is ``backward``,
    registered with the framework through the adapter's ``custom_vjp``.

    ``forward(q, k, v, bias, mask)`` and ``backward(q, k, v, bias, mask, out, lse, d_out,
    d_lse)`` are this module's :func:`forward` (without remat) and :func:`backward` with
    their options bound (and staged by the backend).
    """

    def unpack(args):
        q, k, v, *rest = args
        bias = rest.pop(0) if has_bias else None
        return q, k, v, bias, (rest.pop(0) if has_mask else None)

    def fwd(*args):
        out, lse = forward(*unpack(args))
        return (out, lse), (args, out, lse)

    def bwd(residuals, cotangents):
        args, out, lse = residuals
        dq, dk, dv, db = backward(*unpack(args), out, lse, *cotangents)
        return (dq, dk, dv) + ((db,) if has_bias else ()) + ((None,) if has_mask else ())

    return backend.custom_vjp(fwd, bwd)


@dataclass(frozen=True)
class _Split:
    """An operand cut along one axis for a loop.

    ``chunks`` stacks the full chunks on a new leading axis, ``tail`` is the shorter last
    chunk (None when the size divides the length). An operand that is None or broadcast
    along the axis (extent 1 where the length is not) is kept ``whole`` for every chunk.
    """

    chunks: Any = None
    tail: Any = None
    whole: Any = None

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
    return _Split(chunks=chunks, tail=_slice_axis(x, axis, cut, length) if cut < length else None)


def _slice_axis(x, axis: int, start: int, stop: int):
    return x[(slice(None),) * axis + (slice(start, stop),)]


def _stacked(splits) -> tuple:
    """The stacked chunks of the operands that are cut, to scan over."""
    return tuple(s.chunks for s in splits if s.is_cut)


def _chunk_of(splits, chunks) -> tuple:
    """Each operand's value in one scan step, given that step's slices of ``_stacked``."""
    return tuple(next(chunks) if s.is_cut else s.whole for s in splits)


def _tail_of(splits) -> tuple:
    """Each operand's value for the tail chunk."""
    return tuple(s.tail if s.is_cut else s.whole for s in splits)


def _join(xp, stacked, tail, axis: int):
    """The full chunks' stacked outputs followed by the tail's, as one array along ``axis``."""
    if stacked is None:  # an output that does not exist (no bias: no d_bias)
        return None
    pos = stacked.ndim + axis  # the chunk's own axis, once the stacking axis moves next to it
    moved = xp.permute_dims(stacked, (*range(1, pos), 0, *range(pos, stacked.ndim)))
    shape = moved.shape
    merged = xp.reshape(moved, (*shape[: pos - 1], shape[pos - 1] * shape[pos], *shape[pos + 1 :]))
    return merged if tail is None else xp.concat((merged, tail), axis=axis)


def _sum_groups(xp, x):
    """Sum over the query heads of each key/value head: ``[.., groups, t, d] -> [.., 1, t, d]``."""
    return xp.sum(x, axis=-3, keepdims=True) if x.shape[-3] != 1 else x


def _sum_to(xp, x, shape):
    """Sum ``x`` over the axes along which an array of ``shape`` (same rank) broadcasts."""
    axes = tuple(i for i, (n, m) in enumerate(zip(shape, x.shape, strict=True)) if n == 1 != m)
    return xp.sum(x, axis=axes, keepdims=True) if axes else x


def _cast_all(xp, arrays, dtypes):
    return tuple(
        None if a is None else xp.astype(a, d) for a, d in zip(arrays, dtypes, strict=True)
    )
