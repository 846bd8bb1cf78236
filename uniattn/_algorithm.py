"""Memory-efficient attention (Rabe & Staats 2021), written once against the array API.

Arrays arrive in the canonical layout that :mod:`uniattn._arguments` prepares
(:class:`Operands`)::

    q              [*batch, kv_heads, groups, q_len, d_k]   (heads = kv_heads * groups)
    k              [*batch, kv_heads, 1,      kv_len, d_k]
    v              [*batch, kv_heads, 1,      kv_len, d_v]
    bias, mask     same rank as q; every axis either full or 1 (broadcast)
    sinks          same rank as q, [.., kv_heads, groups, 1, 1] (or broadcast)
    q/k_lengths    [*batch, 1, 1, 1, 1] int32
    q_ids, kv_ids  [*batch, 1, 1, q_len, 1] and [*batch, 1, 1, 1, kv_len] int32
    seed           0-d int32

The scores of a chunk pair are ``z = scale * q kᵀ``, soft-capped (``cap * tanh(z / cap)``),
plus the bias, with ``-inf`` wherever a mask, the window, the lengths or the segment ids
say the query may not attend the key. Sinks join each row's normaliser as one more logit
with a zero value; dropout multiplies kept probabilities by ``1 / (1 - rate)`` and drops
the others, with a mask that depends only on positions (:mod:`uniattn._dropout`).

**Forward** (:func:`forward`). The outer loop runs over blocks of query rows, the inner
loop over key chunks. The inner loop carries, per row, the running maximum ``m`` of the
scores, the running sum ``l`` of ``exp(score - m)`` and the unnormalised output ``acc``;
each key chunk rescales them by ``exp(m_old - m_new)``. The result is ``acc / l`` and the
per-row logsumexp ``m + log(l)`` (with sinks: ``L = logaddexp(m + log(l), sink)``, and the
output rescaled to that normaliser).

**Backward** (:func:`backward`, FlashAttention-2 §3.2). From the output ``O`` and the
logsumexp alone, each chunk's probabilities are recomputed, ``P = exp(S - lse)``; with
``Δ = rowsum(dO ∘ O)``: ``dV += Pᵀ dO``, ``dS = P ∘ (dO Vᵀ - Δ)``, ``dQ += dS K``,
``dK += dSᵀ Q`` and ``d_bias = dS`` (through a soft cap, ``dS ∘ (1 - tanh²)`` for q and
k; with dropout, ``P`` and ``dO Vᵀ`` carry the regenerated mask). The outer loop runs over
key chunks (dK and dV in the inner loop's carry), the inner loop over row blocks (dQ
accumulated per row block). A sink's gradient is ``-Σ_rows exp(sink - L) Δ``.

Which chunk pairs are computed, and which need the causal or window mask, is the
schedule's business (:mod:`uniattn._schedule`): only one ``q_chunk x k_chunk`` block of
scores per head exists at a time, and chunks that no row can see are never computed.

**Non-finite inputs.** The forward and the backward each branch once
(``Backend.cond_call``): inputs whose entries are all finite, padding included, take the
algorithm as it is; the others first zero the padding and isolate non-finite keys and rows
(:meth:`_Context.isolated`; the backward zeroes every non-finite entry instead).

Everything here is array-API calls on ``xp`` and calls to the adapter contract
(:class:`uniattn.backends.Backend`): loops, rematerialisation, ``stop_gradient``,
``cond_call``, and the optional hooks ``matmul``, ``masked``, ``keep_mask``, ``dropped``,
``exp_shifted``,
``row_sums``, ``chunks``, ``concrete_ints`` and the block accumulator.

**Products.** Every product goes through ``Backend.matmul``, whose operands are in
:attr:`_Context.operand_dtype`: float32 (float64 for float64 inputs), the inputs lifted
once, except where the adapter multiplies 16-bit operands into float32 itself
(``Backend.multiplies_16bit``): then q, k, v and dO stay 16-bit and the float32 operands
(scaled queries, probabilities, score gradients) are rounded to the inputs' dtype before
their product, as FlashAttention does. Scores, softmax statistics and accumulators are
float32 either way. A forward the framework differentiates itself (``remat``) keeps float32
products: its autodiff would round the cotangents of 16-bit operands to 16 bits.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from ._dropout import Hash, threshold
from ._schedule import Schedule, Split, join, plus, scan_chunks, split

NEG_INF = float("-inf")
NAN = float("nan")


class Options(NamedTuple):
    """Static (hashable) options of one call, after validation.

    ``left``/``right`` bound the keys a query sees relative to its bottom-right diagonal
    (None: unbounded; ``causal`` is ``right=0``, top-left causal ``right=q_len-kv_len``).
    ``bias_fn``/``mask_fn`` map absolute positions ``([q_chunk, 1], [1, k_chunk])`` to a
    block in the canonical layout.
    """

    scale: float
    query_chunk_size: int
    key_chunk_size: int
    left: int | None = None
    right: int | None = None
    bias_fn: Callable | None = None
    mask_fn: Callable | None = None
    softcap: float | None = None
    dropout_rate: float = 0.0


class Operands(NamedTuple):
    """A call's arrays (None where absent); bias and sinks are differentiable."""

    q: Any
    k: Any
    v: Any
    bias: Any = None
    mask: Any = None
    q_lengths: Any = None
    k_lengths: Any = None
    q_ids: Any = None
    kv_ids: Any = None
    sinks: Any = None
    seed: Any = None


# -- forward -------------------------------------------------------------------------------
def forward(backend: Any, ops: Operands, *, options: Options, remat=True, starts=(0, 0)):
    """Attention output ``[*batch, kv_heads, groups, q_len, d_v]`` and its logsumexp.

    Both are in the accumulation dtype, float32 (float64 for float64 inputs): the caller
    rounds the output to the input dtype, and the backward's ``Δ = rowsum(dO ∘ O)`` uses
    the unrounded one. The logsumexp ``[*batch, kv_heads, groups, q_len]`` is ``-inf`` on
    rows that see no key (the sink's logit with sinks); those rows' output is 0. With
    ``remat`` each chunk's intermediates are recomputed when the framework differentiates
    through the loops. ``starts`` are the positions of the first query and key (int or 0-d
    int array) when the call is one block of a longer sequence (:class:`Schedule`).
    """
    # Differentiated by the framework (remat), products stay float32: autodiff would round
    # the cotangents of 16-bit operands to 16 bits (dP, summed into a broadcast d_bias).
    c = _Context(backend, ops, options, starts, narrow=not remat)
    xp = c.xp
    q, k, v = ops.q, ops.k, ops.v
    if c.empty:
        zero = _connected_zero(xp, c.acc_dtype, q, k, v, ops.bias, ops.sinks)
        out = c.zeros((*q.shape[:-1], v.shape[-1])) + zero
        lse = xp.full(q.shape[:-1], NEG_INF, dtype=c.acc_dtype, device=c.device) + zero
        if ops.sinks is not None:
            lse = xp.logaddexp(lse, c.lift(ops.sinks)[..., 0])
        return out, lse
    q, k, v = c.operand(c.fold(q)), c.operand(k), c.operand(v)
    if k.shape[-1] == 0:
        # Zero-width keys: a zero column in q and k (the scores stay 0), so that a key
        # whose value is not finite has an entry for `isolated` to make NaN.
        q, k = (
            xp.concat((x, xp.zeros((*x.shape[:-1], 1), dtype=x.dtype, device=c.device)), axis=-1)
            for x in (q, k)
        )
    passed = (c.lift(c.fold(ops.bias)), c.fold(ops.mask), c.lift(c.fold(ops.sinks)))
    attend = functools.partial(_attend, c, remat=remat)
    finite = c.all_finite(q, k, v)
    return backend.cond_call(finite, attend, c.isolated, (q, k, v), passed, reuse=c.reuse)


def _attend(c: _Context, q, k, v, bias, mask, sinks, *, remat: bool, finite: bool = False):
    """:func:`forward` of prepared operands: finite, or isolated by :meth:`_Context.isolated`
    (``finite``: known to be finite)."""
    backend, xp, schedule = c.backend, c.xp, c.schedule

    def fold_in(m, l, acc, q_c, k_c, v_c, bias_c, mask_c, q_ids, kv_ids, r, j, *, kind):
        """Fold key chunk ``j`` into the running (max, sum, accumulator) of row block ``r``;
        ``kind`` is the pair's band's ``(masked, one_segment)`` (which rules apply)."""
        masked, one_segment = kind
        args = (bias_c, mask_c, q_ids, kv_ids)
        s, _ = c.scores(q_c, k_c, r, j, masked, *args, one_segment=one_segment, finite=finite)
        # The result does not depend on m, so no gradient needs to flow through it.
        m_new = xp.maximum(m, backend.stop_gradient(xp.max(s, axis=-1, keepdims=True)))
        m_ref = xp.where(m_new == NEG_INF, 0.0, m_new)  # rows that have seen no key yet
        p = backend.exp_shifted(s, m_ref)
        rescale = xp.exp(m - m_ref)
        l = l * rescale + backend.row_sums(p)
        p = c.operand(c.dropped(p, c.keep(r, j, p.shape)))
        acc = acc * rescale + backend.matmul(p, v_c)
        return m_new, l, acc

    kinds = [(masked, one_segment) for masked in (False, True) for one_segment in (False, True)]
    folds = {kind: functools.partial(fold_in, kind=kind) for kind in kinds}
    if remat:
        folds = {kind: backend.remat(fn) for kind, fn in folds.items()}

    kv_ids_by_key = split(xp, c.kv_ids, -1, schedule.keys)

    def row_block(q_c, bias_c, mask_c, q_ids, sinks_c, r, k_chunks, v_chunks):
        """Output and logsumexp of row block ``r`` against every key chunk it can see."""
        # Per block: a scaled copy of q would be one more n·d.
        q_c = c.operand(c.lift(q_c) * c.options.scale)
        by_key = (split(xp, bias_c, -1, schedule.keys), split(xp, mask_c, -1, schedule.keys))
        # Connected to the inputs even if no key chunk is visible (no loop trip runs).
        first_k, first_v = k_chunks[0, ...], v_chunks[0, ...]
        zero = _connected_zero(xp, c.acc_dtype, q_c, first_k, first_v, bias_c, sinks_c)
        rows = q_c.shape[:-1]
        carry = (
            xp.full((*rows, 1), NEG_INF, dtype=c.acc_dtype, device=c.device) + zero,
            c.zeros((*rows, 1)) + zero,
            c.broadcast_zeros((*rows, first_v.shape[-1]), zero),
        )
        for band in schedule.key_bands(r):

            def body(j, carry, fold=folds[band.masked, band.one_segment]):
                chunks = (k_chunks[j, ...], v_chunks[j, ...], by_key[0].at(j), by_key[1].at(j))
                return fold(*carry, q_c, *chunks, q_ids, kv_ids_by_key.at(j), r, j)

            carry = backend.fori_loop(band.lower, band.upper, body, carry, band.trips)
        m, l, acc = carry
        seen = l != 0.0
        l_safe = xp.where(seen, l, 1.0)
        out, lse = acc / l_safe, xp.where(seen, m + xp.log(l_safe), NEG_INF)
        if sinks_c is not None:
            out, lse = join_sinks(xp, out, lse, sinks_c)
        return out, lse[..., 0]

    if remat:
        row_block = backend.remat(row_block)
    k_chunks = backend.chunks(split(xp, k, -2, schedule.keys).chunks)
    v_chunks = backend.chunks(split(xp, v, -2, schedule.keys).chunks)

    def step(carry, r, row_chunks):
        return carry, row_block(*row_chunks, r, k_chunks, v_chunks)

    by_rows = tuple(split(xp, x, -2, schedule.rows) for x in (q, bias, mask, c.q_ids, sinks))
    _, (out, lse) = scan_chunks(backend, step, (), by_rows, schedule.rows)
    out, lse = join(xp, out, -2, schedule.rows), join(xp, lse, -1, schedule.rows)
    return c.fold(out), c.fold(lse[..., None])[..., 0]


# -- backward ------------------------------------------------------------------------------
def backward(
    backend: Any, ops: Operands, out, lse, d_out, d_lse, *, options: Options, starts=(0, 0)
):
    """Cotangents ``(dq, dk, dv, d_bias, d_sinks)`` of :func:`forward`'s ``(out, lse)``.

    ``d_lse`` may be None. Each cotangent has its primal's shape and dtype; ``d_bias`` and
    ``d_sinks`` are None without a bias or sinks. Rows that see no key get zero gradients.
    ``out`` and ``lse`` may be those of a longer key sequence than ``ops.k`` (ring
    attention): the gradients are then this block's share.
    """
    c = _Context(backend, ops, options, starts)
    xp = c.xp
    q, k, v, bias, sinks = ops.q, ops.k, ops.v, ops.bias, ops.sinks
    dtypes = tuple(None if x is None else x.dtype for x in (q, k, v, bias, sinks))
    if c.empty:
        grads = [None if x is None else xp.zeros_like(x) for x in (q, k, v, bias, sinks)]
        if sinks is not None and d_lse is not None:  # L = sink: d sink = Σ d_lse
            grads[4] = xp.astype(_sum_to(xp, c.lift(d_lse)[..., None], sinks.shape), sinks.dtype)
        return tuple(grads)
    q, k, v = c.operand(c.fold(q)), c.operand(k), c.operand(v)
    backprop = functools.partial(_backprop, c, dtypes)
    passed = (bias, ops.mask, sinks, out, lse, d_out, d_lse)
    finite = c.all_finite(q, k, v)
    return backend.cond_call(finite, backprop, c.zeroed, (q, k, v), passed, reuse=c.reuse)


class _RowChunk(NamedTuple):
    """The operands of one row block in the backward, each in the orientation its product
    needs (transposed once, outside the loops), so no score block is ever transposed."""

    q: Any  # scaled queries [.., rows, d_k]
    q_t: Any  # their transpose [.., d_k, rows]
    d_out: Any
    d_out_t: Any
    lse: Any  # [.., rows, 1]
    delta: Any  # Δ = rowsum(dO ∘ O) - d_lse, [.., rows, 1]
    q_ids: Any
    bias: Any
    mask: Any


def _backprop(
    c: _Context, dtypes, q, k, v, bias, mask, sinks, out, lse, d_out, d_lse, finite=False
):
    """:func:`backward` of prepared operands: finite, or zeroed by :meth:`_Context.zeroed`
    (``finite``: known to be finite)."""
    backend, xp, schedule = c.backend, c.xp, c.schedule
    t = xp.matrix_transpose
    # Rows whose output is NaN (they attend a non-finite input, see _Context.isolated)
    # are constants here: they contribute nothing, so every other gradient stays exact.
    affected = c.fold(xp.logical_not(xp.logical_or(xp.isfinite(lse), lse == NEG_INF))[..., None])
    q = c.operand(c.lift(q) * c.options.scale)
    bias, mask, sinks = c.lift(c.fold(bias)), c.fold(mask), c.lift(c.fold(sinks))
    d_out = xp.where(affected, 0.0, c.lift(c.fold(d_out)))
    delta = xp.vecdot(d_out, c.lift(c.fold(out)))[..., None]
    d_out = c.operand(d_out)  # Δ above from the float32 dO; the products take it as operand
    if d_lse is not None:  # d lse / d S = P, so d_lse joins Δ
        delta = delta - c.fold(c.lift(d_lse)[..., None])
    delta = xp.where(affected, 0.0, delta)  # the output is NaN there
    # P = exp(S - lse) is 0 on rows that see no key (lse -inf) and on affected rows.
    lse = c.fold(lse[..., None])
    lse = xp.where(affected, float("inf"), xp.where(lse == NEG_INF, 0.0, lse))

    def by_rows(x, axis=-2):
        return c.indexed(split(xp, x, axis, schedule.rows))

    rows = (by_rows(q), by_rows(t(q), -1), by_rows(d_out), by_rows(t(d_out), -1))
    rows += (by_rows(lse), by_rows(delta), by_rows(c.q_ids))
    # Loop carries start connected to the inputs, so they have the inputs' type where a
    # framework's type says more than shape and dtype (a mesh's varying manual axes).
    zero = _connected_zero(xp, c.acc_dtype, q, k, v)
    dq_sum = _RowSum(c, zero, by_blocks=True)
    db_sum = _RowSum(c, zero, by_blocks=bias is not None and bias.shape[-2] == schedule.rows.length)
    bias_by_keys = bias is not None and bias.shape[-1] == c.kv_len

    def pair_grads(row: _RowChunk, r, k_c, v_t, kv_ids, j, band):
        """dQ of chunk pair (``r``, ``j``) of ``band``, and its contributions dKᵀ = Qᵀ dS,
        dVᵀ = dOᵀ P and d_bias = dS."""
        args = (row.bias, row.mask, row.q_ids, kv_ids)
        flags = dict(one_segment=band.one_segment, overlapping_rows=band.masked, finite=finite)
        s, tanh = c.scores(row.q, k_c, r, j, band.masked, *args, **flags)
        p = backend.exp_shifted(s, row.lse)
        keep = c.keep(r, j, s.shape)  # one mask for both products it scales
        dp = c.dropped(backend.matmul(row.d_out, v_t), keep)
        ds = p * (dp - row.delta)
        d_raw = ds if tanh is None else ds * (1.0 - tanh * tanh)  # through the soft cap
        d_raw_op = c.operand(d_raw)
        dk_t = _sum_groups(xp, backend.matmul(row.q_t, d_raw_op))
        dv_t = _sum_groups(xp, backend.matmul(row.d_out_t, c.operand(c.dropped(p, keep))))
        db = None if row.bias is None else _sum_to(xp, ds, row.bias.shape)
        return backend.matmul(d_raw_op, k_c), dk_t, dv_t, db

    def key_chunk(k_c, v_c, bias_k, mask_k, kv_ids, j, dq, db):
        """dK and dV of key chunk ``j``; its contributions added to dQ and d_bias."""
        row_extras = (split(xp, bias_k, -2, schedule.rows), split(xp, mask_k, -2, schedule.rows))
        v_t = t(v_c)  # a chunk at a time: no transposed copy of all of v
        *outer, k_chunk, d_k = k_c.shape
        if bias_by_keys:  # this chunk's columns of d_bias
            db = db_sum.zeros((*bias_k.shape[:-1], k_chunk))
        # Filled, not broadcast: a chunk that no row sees returns these as its gradients.
        carry = (c.zeros((*outer, d_k, k_chunk)) + zero, c.zeros(v_t.shape) + zero, dq, db)
        for band in schedule.row_bands(j):

            def body(r, carry, band=band):
                dk_t, dv_t, dq, db = carry
                row = _RowChunk(*(s.at(r) for s in (*rows, *row_extras)))
                g_q, g_kt, g_vt, g_b = pair_grads(row, r, k_c, v_t, kv_ids, j, band)
                db = None if db is None else db_sum.add(db, r, g_b)
                return dk_t + g_kt, dv_t + g_vt, dq_sum.add(dq, r, g_q), db

            carry = backend.fori_loop(band.lower, band.upper, body, carry, band.trips)
        dk_t, dv_t, dq, db = carry
        return t(dk_t), t(dv_t), dq, db_sum.value(db) if bias_by_keys else db

    def step(carry, j, key_chunks):
        dq, db = carry
        dk, dv, dq, db = key_chunk(*key_chunks, j, dq, db)
        if bias_by_keys:  # d_bias by key chunk is a per-step output
            return (dq, None), (dk, dv, db)
        return (dq, db), (dk, dv, None)

    by_keys = [split(xp, x, -2, schedule.keys) for x in (k, v)]
    by_keys += [split(xp, x, -1, schedule.keys) for x in (bias, mask, c.kv_ids)]
    db = None if bias is None or bias_by_keys else db_sum.zeros(bias.shape)
    init = (dq_sum.zeros(q.shape), db)
    (dq, db), (dk, dv, db_by_keys) = scan_chunks(backend, step, init, by_keys, schedule.keys)
    dk, dv = join(xp, dk, -2, schedule.keys), join(xp, dv, -2, schedule.keys)
    if bias_by_keys:
        db = join(xp, db_by_keys, -1, schedule.keys)
    elif bias is not None:
        db = db_sum.value(db)
    d_sinks = None
    if sinks is not None:  # folding is its own inverse: these are the unfolded operands
        d_sinks = sink_cotangent(xp, c.fold(sinks), c.fold(lse), c.fold(delta))
    grads = (c.fold(dq_sum.value(dq)) * c.options.scale, dk, dv, c.fold(db), d_sinks)
    return tuple(
        None if g is None else xp.astype(g, d, copy=False)
        for g, d in zip(grads, dtypes, strict=True)
    )


@dataclass(frozen=True)
class _RowSum:
    """A sum of per-row-block contributions: held one block per row block where the result
    has rows (the adapter's block accumulator), else as one array that every block adds to."""

    c: _Context
    zero: Any  # a connected zero (:func:`_connected_zero`) that starts every sum
    by_blocks: bool

    def zeros(self, shape):
        if not self.by_blocks:
            return self.c.zeros(shape) + self.zero  # may be the result: never a broadcast
        rows = self.c.schedule.rows
        shape = (rows.count, *shape[:-2], rows.size, shape[-1])
        return self.c.backend.blocks(self.c.broadcast_zeros(shape, self.zero))  # then stacked

    def add(self, acc, r, update):
        return self.c.backend.add_block(acc, r, update) if self.by_blocks else acc + update

    def value(self, acc):
        """The summed array (the last block's overlap is 0, so it is counted once)."""
        if not self.by_blocks:
            return acc
        return join(self.c.xp, self.c.backend.stacked(acc), -2, self.c.schedule.rows)


# -- what every chunk of a call shares ------------------------------------------------------
class _Context:
    """The namespace, dtypes, schedule and masking rules of one call.

    A single query position (decoding) is computed with its ``groups`` query heads folded
    into rows, so each key chunk is multiplied once per key/value head, not once per query
    head.
    """

    def __init__(
        self, backend, ops: Operands, options: Options, starts=(0, 0), narrow: bool = True
    ):
        self.backend, self.options = backend, options
        self.xp = xp = backend.namespace()
        q, k = ops.q, ops.k
        self.device = backend.device(q)
        self.acc_dtype = xp.float64 if q.dtype == xp.float64 else xp.float32
        # The dtype of every product's operands (see the module's docstring).
        narrow = narrow and backend.dtype_name(q) in ("float16", "bfloat16")
        narrow = narrow and backend.multiplies_16bit(self.device)
        self.operand_dtype = q.dtype if narrow else self.acc_dtype
        self.q_len, self.kv_len = q.shape[-2], k.shape[-2]
        self.batch = tuple(q.shape[:-4])
        self.folded = self.q_len == 1 and q.shape[-3] > 1
        self.q_lengths, self.k_lengths = ops.q_lengths, ops.k_lengths
        # Lengths count from the call's first query and key; positions from the sequence's.
        self.q_end, self.k_end = (
            None if n is None else plus(start, n)
            for n, start in zip((ops.q_lengths, ops.k_lengths), starts, strict=True)
        )
        # Padding never matches: negative query ids become -1 and negative key ids -2, so
        # the segment rule of a chunk pair is one comparison.
        self.q_ids, self.kv_ids = (
            None if ids is None else xp.where(ids >= 0, ids, padding)
            for ids, padding in ((ops.q_ids, -1), (ops.kv_ids, -2))
        )
        self.empty = 0 in q.shape[:-1] or self.kv_len == 0
        # How often the loops read each entry of q, k and v: the rows each key meets, at
        # most the keys each row meets (``Backend.cond_call``).
        self.reuse = min(q.shape[-3] if self.folded else self.q_len, self.kv_len)
        live = not self.empty
        # The longest sequence bounds the loops (an empty batch has none: nothing runs).
        self.schedule = Schedule(
            xp,
            q_len=self.q_len,
            kv_len=self.kv_len,
            rows=q.shape[-3] if self.folded else self.q_len,
            folded=self.folded,
            query_chunk=options.query_chunk_size,
            key_chunk=options.key_chunk_size,
            left=options.left,
            right=options.right,
            q_max=xp.max(ops.q_lengths) if live and ops.q_lengths is not None else None,
            k_max=xp.max(ops.k_lengths) if live and ops.k_lengths is not None else None,
            q_ids=self._flat_ids(self.q_ids) if live else None,
            kv_ids=self._flat_ids(self.kv_ids) if live else None,
            q_start=starts[0],
            k_start=starts[1],
            device=self.device,
            concrete=backend.concrete_ints,
        )
        self.hash = self.row_seeds = None
        if options.dropout_rate and live:
            self.hash = Hash(xp, self.device)
            kv_heads, groups = q.shape[-4], q.shape[-3]
            batch_index = xp.arange(math.prod(self.batch), dtype=xp.int32, device=self.device)
            heads = xp.arange(kv_heads * q.shape[-3], dtype=xp.int32, device=self.device)
            heads = self.fold(xp.reshape(heads, (kv_heads, groups, 1, 1)))
            seed = xp.reshape(ops.seed, (1,) * (len(self.batch) + 4))
            self.row_seeds = self.hash.row_seeds(
                seed, xp.reshape(batch_index, (*self.batch, 1, 1, 1, 1)), heads
            )

    def _flat_ids(self, ids):
        return None if ids is None else self.xp.reshape(ids, (*self.batch, -1))

    def fold(self, x):
        """A row-axis operand with the groups axis folded into rows (decoding only)."""
        if x is None or not self.folded:
            return x
        return self.xp.permute_dims(x, (*range(x.ndim - 3), x.ndim - 2, x.ndim - 3, x.ndim - 1))

    def lift(self, x):
        """``x`` in the accumulation dtype (float32, or float64 for float64 inputs)."""
        return None if x is None else self.xp.astype(x, self.acc_dtype, copy=False)

    def operand(self, x):
        """``x`` in the dtype of the products' operands, :attr:`operand_dtype`."""
        return None if x is None else self.xp.astype(x, self.operand_dtype, copy=False)

    def zeros(self, shape):
        return self.xp.zeros(shape, dtype=self.acc_dtype, device=self.device)

    def broadcast_zeros(self, shape, zero):
        """Zeros of ``shape`` that start a loop carry, connected through ``zero``
        (:func:`_connected_zero`): a broadcast of one entry, so no block is filled and
        added to before the loop's first trip writes a new one."""
        return self.xp.broadcast_to(self.zeros(()) + zero, shape)

    def indexed(self, operand: Split) -> Split:
        """``operand`` as a loop body indexes it by its loop's index (``Backend.chunks``)."""
        return operand if operand.chunks is None else Split(self.backend.chunks(operand.chunks))

    # -- scores ------------------------------------------------------------------------
    def scores(
        self,
        q_c,
        k_c,
        r,
        j,
        masked,
        bias,
        mask,
        q_ids,
        kv_ids,
        one_segment=False,
        overlapping_rows=False,
        finite=False,
    ):
        """Scores of row block ``r`` and key chunk ``j``, ``-inf`` where not attended; and
        ``tanh(z / softcap)`` of the raw scores ``z`` (None without a soft cap).

        ``q_c`` is pre-scaled; ``k_c`` is a chunk of keys as they are (the product
        transposes it). ``masked=False`` leaves out the structural rules, for a pair that
        the schedule shows every row sees whole; masks, lengths and segment ids, which vary
        per batch, still apply. ``one_segment``: every query and key of the pair holds
        one and the same valid id, so the segment rule is left out. ``overlapping_rows``
        masks the last row block's overlap. ``finite``: q and k are known to be finite.
        """
        xp, o, schedule = self.xp, self.options, self.schedule
        s = self.backend.matmul(q_c, k_c, transposed=True)
        tanh = None
        if o.softcap is not None:
            tanh = xp.tanh(s * (1.0 / o.softcap))
            s = tanh * o.softcap
        if bias is not None:
            s = s + bias
        rules = [mask]
        if q_ids is not None and not one_segment:
            rules.append(q_ids == kv_ids)  # padding never matches (see __init__)
        needs_positions = schedule.needs_rules(masked, overlapping_rows) or any(
            x is not None for x in (o.bias_fn, o.mask_fn, self.q_lengths, self.k_lengths)
        )
        if needs_positions:
            pos = schedule.positions(r, j, q_c.shape[-2], k_c.shape[-2])
            # Callables see real query positions; folded rows get their heads' values.
            fn_q = pos.query[:1, ...] if self.folded else pos.query
            if o.bias_fn is not None:
                s = s + self.lift(self.fold(o.bias_fn(fn_q, pos.key)))
            if o.mask_fn is not None:
                rules.append(self.fold(o.mask_fn(fn_q, pos.key)))
            rules += schedule.rules(pos, r, j, masked, overlapping_rows)
            if self.k_end is not None:
                rules.append(pos.key < self.k_end)
            if self.q_end is not None:
                rules.append(pos.query < self.q_end)
        allowed = None
        for rule in rules:
            if rule is not None:
                allowed = rule if allowed is None else xp.logical_and(allowed, rule)
        if allowed is None:
            return s, tanh
        nan_free = finite and bias is None and o.bias_fn is None  # a bias may hold NaN
        return self.backend.masked(s, allowed, nan_free), tanh

    def keep(self, r, j, shape):
        """Dropout's mask of row block ``r`` and key chunk ``j`` for a block of ``shape``
        (``Backend.keep_mask``), or None without dropout."""
        rate = self.options.dropout_rate
        if not rate:
            return None
        pos = self.schedule.positions(r, j, shape[-2], shape[-1])
        return self.hash.keep(self.backend, self.row_seeds, pos.query, pos.key, threshold(rate))

    def dropped(self, x, keep):
        """``x`` with dropout applied by the mask ``keep`` (:meth:`keep`): kept entries
        times ``1 / (1 - rate)``, the others 0. ``x`` is a temporary never read again."""
        if keep is None:
            return x
        return self.backend.dropped(x, keep, 1.0 / (1.0 - self.options.dropout_rate))

    # -- non-finite inputs -------------------------------------------------------------
    def all_finite(self, *arrays):
        """Whether every entry of ``arrays`` (padding included) is finite, as a 0-d bool:
        one sum per array. A sum of finite values that overflows only costs the safe
        branch."""
        xp = self.xp
        # Summed in the accumulation dtype: a float16 sum of finite values overflows early.
        return xp.isfinite(sum(self._sum(x) for x in arrays))

    def _sum(self, x):
        xp = self.xp
        return xp.sum(x) if x.dtype == self.acc_dtype else xp.sum(x, dtype=self.acc_dtype)

    def isolated(self, q, k, v):
        """``q``, ``k``, ``v`` with padded keys zeroed and non-finite rows and keys
        isolated: the forward's safe branch.

        Padding past ``key_lengths`` may hold anything (NaN, inf), and a masked key's zero
        weight times NaN would still be NaN, so padded keys and values become 0. A key or
        value with a NaN or inf entry must turn NaN exactly the rows that attend it
        (masking replaces its scores with -inf everywhere else): such a key becomes all
        NaN and its value 0, so that ``p @ v`` of the rows that do not attend it stays
        finite. A query row with a non-finite entry becomes all NaN.
        """
        xp = self.xp
        k, v = self._unpadded(k, v)
        key_ok = xp.logical_and(_finite_rows(xp, k), _finite_rows(xp, v))
        k, v = xp.where(key_ok, k, NAN), xp.where(key_ok, v, 0.0)
        return xp.where(_finite_rows(xp, q), q, NAN), k, v

    def zeroed(self, q, k, v):
        """``q``, ``k``, ``v`` with padded keys and every non-finite entry 0: the
        backward's safe branch (finite padding gets zero weight, hence adds 0)."""
        xp = self.xp
        return tuple(xp.where(xp.isfinite(x), x, 0.0) for x in (q, *self._unpadded(k, v)))

    def _unpadded(self, k, v):
        """``k``, ``v`` with the keys past ``key_lengths`` 0."""
        xp = self.xp
        if self.k_lengths is not None:
            positions = xp.arange(self.kv_len, dtype=xp.int32, device=self.device)
            inside = xp.reshape(positions, (-1, 1)) < self.k_lengths
            k, v = xp.where(inside, k, 0.0), xp.where(inside, v, 0.0)
        return k, v


def join_sinks(xp, out, lse, sinks):
    """``out`` and ``lse`` (``[.., rows, 1]``) with each row's sink logit joining its
    normaliser as one more logit with a zero value; rows that see no key keep output 0."""
    seen = lse != NEG_INF
    total = xp.logaddexp(lse, sinks)
    return out * xp.where(seen, xp.exp(lse - xp.where(seen, total, 0.0)), 0.0), total


def sink_cotangent(xp, sinks, lse, delta):
    """``d sinks`` from the logsumexp ``L`` and ``Δ = rowsum(dO ∘ O) - d_lse`` (both
    ``[.., rows, 1]``): ``d L / d sink = exp(sink - L)``, and the output depends on ``L``
    alone, so the cotangent is ``-Σ_rows exp(sink - L) Δ``, summed to the sinks' shape."""
    per_row = xp.exp(sinks - lse) * delta
    return _sum_to(xp, -xp.sum(per_row, axis=-2, keepdims=True), sinks.shape)


def _connected_zero(xp, dtype, *arrays):
    """A 0 that depends on every given array (a sum of empty slices: exactly 0, never NaN),
    so that a result it is added to stays differentiable (zero gradients, not an error)
    where no loop trip ran (empty inputs, or every key masked by lengths), and a loop carry
    it starts has the inputs' type where that says more than shape and dtype."""
    return sum(xp.sum(xp.astype(x[..., :0], dtype)) for x in arrays if x is not None)


def _finite_rows(xp, x):
    """Whether each row of ``x`` is finite: its largest magnitude is below inf (a NaN makes
    the maximum NaN). One reduction, with no boolean copy of ``x``."""
    if x.shape[-1] == 0:  # an empty row is finite (a maximum of nothing is an error)
        return xp.all(xp.isfinite(x), axis=-1, keepdims=True)
    return xp.max(xp.abs(x), axis=-1, keepdims=True) < float("inf")


def _sum_groups(xp, x):
    """Sum over the query heads of each key/value head: ``[.., groups, t, d] -> [.., 1, t, d]``."""
    return xp.sum(x, axis=-3, keepdims=True) if x.shape[-3] != 1 else x


def _sum_to(xp, x, shape):
    """Sum ``x`` over the axes along which an array of ``shape`` (same rank) broadcasts."""
    axes = tuple(i for i, (n, m) in enumerate(zip(shape, x.shape, strict=True)) if n == 1 != m)
    return xp.sum(x, axis=axes, keepdims=True) if axes else x
