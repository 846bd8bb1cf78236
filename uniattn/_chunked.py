"""Memory-efficient attention (Rabe & Staats 2021), written once against the array API.

Arrays arrive in the canonical layout prepared by :mod:`uniattn._api`::

    q              [*batch, kv_heads, groups, q_len, d_k]   (heads = kv_heads * groups)
    k              [*batch, kv_heads, 1,      kv_len, d_k]
    v              [*batch, kv_heads, 1,      kv_len, d_v]
    bias, mask     same rank as q; every axis either full or 1 (broadcast)
    q/k_lengths    [*batch, 1, 1, 1, 1] int32, or None

**Forward** (:func:`forward`): the outer loop runs over blocks of query rows, the inner
loop over key chunks. The inner loop carries, per row, the running maximum ``m`` of the
scores, the running sum ``l`` of ``exp(score - m)`` and the unnormalised output ``acc``;
each key chunk rescales them by ``exp(m_old - m_new)``. It returns the output and the
per-row logsumexp ``m + log(l)``.

**Backward** (:func:`backward`, FlashAttention-2 §3.2): from the output ``O`` and the
logsumexp alone, recompute each chunk's probabilities ``P = exp(S - lse)``; with
``Δ = rowsum(dO ∘ O)``, ``dV += Pᵀ dO``, ``dS = P ∘ (dO Vᵀ - Δ)``, ``dQ += dS K``,
``dK += dSᵀ Q`` and ``d_bias = dS``. The outer loop runs over key chunks (dK, dV in the
inner carry, dQ carried as one block per row block, added to with the adapter's
``add_block``).

**Chunks**: a length its chunk size does not divide gets a last chunk that ends at the
length and overlaps its predecessor; the overlapped positions are masked out of it, so
every chunk has one static shape and nothing is padded. **Skipping**: causal, window and
length masks bound the inner loops (``fori_loop(lower, upper)``): key chunks no row of a
block can see, and row blocks that see none of a key chunk, are never computed. Each inner
loop runs in bands (:func:`_bands`): partly masked chunks at the edges, and between them
chunks every row sees whole, computed without the structural mask.

**Non-finite inputs** (:meth:`_Context.isolated`, :meth:`_Context.zeroed`): the forward and
the backward each branch once (``Backend.cond_call``). Inputs whose entries are all finite,
padding included, take the algorithm as it is; the others first zero the padding and isolate
non-finite keys and rows (the backward: zero every non-finite entry).

Only one ``q_chunk x k_chunk`` block of scores per head exists at a time. Loops,
rematerialisation, ``stop_gradient``, ``cond``, ``chunks`` (how a loop body holds stacked
chunks), the block accumulator (``blocks``, ``add_block``, ``stacked``), the score product
``matmul_transposed`` and ``exp_shifted`` (which may reuse the score block's memory) come from
the backend adapter; the rest is array-API calls on ``xp``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

NEG_INF = float("-inf")
NAN = float("nan")


class Options(NamedTuple):
    """Static (hashable) options of one call, after validation.

    ``left``/``right`` bound the keys a query sees relative to its diagonal (None:
    unbounded; ``causal`` is ``right=0``). ``bias_fn``/``mask_fn`` map absolute positions
    ``([q_chunk, 1], [1, k_chunk])`` to a block in the canonical layout.
    """

    scale: float
    query_chunk_size: int
    key_chunk_size: int
    left: int | None = None
    right: int | None = None
    bias_fn: Callable | None = None
    mask_fn: Callable | None = None


@dataclass(frozen=True)
class _Axis:
    """One axis cut into ``count`` chunks of ``size``; the last one ends at ``length``."""

    length: int
    size: int
    xp: Any = field(compare=False, repr=False, default=None)

    @property
    def count(self) -> int:
        return -(-self.length // self.size)

    @property
    def overlaps(self) -> bool:
        return self.length % self.size != 0

    def start(self, index):
        """First position of chunk ``index`` (the last chunk's is pulled back)."""
        start = index * self.size
        return _min(self.xp, start, self.length - self.size) if self.overlaps else start


class _Context:
    """What every chunk of one call shares: namespace, dtypes, axes and the mask rules.

    A single query row (decoding) is computed with its ``groups`` query heads folded into
    rows, so each key chunk is multiplied once per key/value head, not once per query head.
    """

    def __init__(self, backend, q, k, q_lengths, k_lengths, options: Options):
        self.backend, self.options = backend, options
        self.xp = xp = backend.namespace()
        self.device = backend.device(q)
        self.acc_dtype = xp.float64 if q.dtype == xp.float64 else xp.float32
        self.q_len, self.kv_len = q.shape[-2], k.shape[-2]
        self.folded = self.q_len == 1 and q.shape[-3] > 1
        # Folded rows are the query heads of one position: always a single block.
        n_rows = q.shape[-3] if self.folded else self.q_len
        row_chunk = n_rows if self.folded else options.query_chunk_size
        self.rows = _Axis(n_rows, min(row_chunk, max(n_rows, 1)), xp)
        self.keys = _Axis(self.kv_len, min(options.key_chunk_size, max(self.kv_len, 1)), xp)
        self.q_lengths, self.k_lengths = q_lengths, k_lengths
        self.empty = 0 in q.shape[:-1] or self.kv_len == 0
        # The longest sequence bounds the loops (an empty batch has none: nothing runs).
        self.q_max = None if q_lengths is None or self.empty else xp.max(q_lengths)
        self.k_max = None if k_lengths is None or self.empty else xp.max(k_lengths)

    # -- layout --------------------------------------------------------------------------
    def fold(self, x):
        """A row-axis operand with the groups axis folded into rows (decoding only)."""
        if x is None or not self.folded:
            return x
        return self.xp.permute_dims(x, (*range(x.ndim - 3), x.ndim - 2, x.ndim - 3, x.ndim - 1))

    def lift(self, x):
        """``x`` in the accumulation dtype (float32, or float64 for float64 inputs)."""
        return None if x is None else self.xp.astype(x, self.acc_dtype, copy=False)

    def all_finite(self, *arrays):
        """Whether every entry of ``arrays`` (padding included) is finite, as a 0-d bool:
        one sum per array. A sum of finite values that overflows only costs the safe
        branch."""
        xp = self.xp
        return xp.isfinite(sum(xp.sum(x) for x in arrays))

    def isolated(self, q, k, v):
        """``q``, ``k``, ``v`` with padded keys zeroed and non-finite rows and keys
        isolated: the forward's safe branch (finite inputs need neither, see :func:`forward`).

        Padding past ``key_lengths`` may hold anything (NaN, inf), and a masked key's zero
        weight times NaN would still be NaN, so padded keys and values become 0. A key or
        value with a NaN or inf entry must turn NaN exactly the rows that attend it
        (masking replaces its scores with -inf everywhere else): such a key becomes all
        NaN and its value 0, so that ``p @ v`` of the rows that do not attend it stays
        finite. A query row with a non-finite entry becomes all NaN.
        """
        k, v = _isolate_non_finite_keys(self.xp, *self._unpadded(k, v))
        return _isolate_rows(self.xp, q), k, v

    def zeroed(self, q, k, v):
        """``q``, ``k``, ``v`` with padded keys and every non-finite entry 0: the backward's
        safe branch (finite inputs need neither: finite padding gets zero weight, hence
        adds 0; see :func:`backward`)."""
        return _zero_non_finite(self.xp, q, *self._unpadded(k, v))

    def _unpadded(self, k, v):
        """``k``, ``v`` with the keys past ``key_lengths`` 0."""
        xp = self.xp
        if self.k_lengths is not None:
            inside = xp.reshape(self._arange(0, self.kv_len), (-1, 1)) < self.k_lengths
            k, v = xp.where(inside, k, 0.0), xp.where(inside, v, 0.0)
        return k, v

    def indexed(self, split: _Split) -> _Split:
        """``split`` as a loop body indexes it by its loop's index (``Backend.chunks``)."""
        return split if split.chunks is None else _Split(self.backend.chunks(split.chunks))

    def zeros(self, shape):
        return self.xp.zeros(shape, dtype=self.acc_dtype, device=self.device)

    # -- masking -------------------------------------------------------------------------
    def _arange(self, start, n):
        return self.xp.arange(n, dtype=self.xp.int32, device=self.device) + start

    def scores(self, q_c, k_c, bias_c, mask_c, r_index, k_index, masked, overlapping_rows=False):
        """Scaled scores of row block ``r_index`` and key chunk ``k_index``; -inf where
        not attended. ``q_c`` is pre-scaled; ``k_c`` is a chunk of keys as they are,
        transposed in the product (``Backend.matmul_transposed``): transposing all of k
        once, outside the loops, costs no time either, but TensorFlow and XLA materialise
        it, one more n·d buffer.

        ``masked=False`` leaves out the structural rules (window, causal, the last key
        chunk's overlap), for a chunk pair that loop bounds show to be whole; masks and
        lengths, which vary per batch, still apply. ``overlapping_rows`` masks the last row
        block's overlap (the backward sums over rows, so it must not count them twice).
        """
        xp, o = self.xp, self.options
        s = self.backend.matmul_transposed(q_c, k_c)
        if bias_c is not None:
            s = s + bias_c
        if not self.needs_positions(masked, overlapping_rows):
            return s if mask_c is None else xp.where(mask_c, s, NEG_INF)
        rows = xp.reshape(self._arange(self.rows.start(r_index), q_c.shape[-2]), (-1, 1))
        pos_q = rows * 0 if self.folded else rows  # folded rows are heads at position 0
        pos_k = xp.reshape(self._arange(self.keys.start(k_index), k_c.shape[-2]), (1, -1))
        # Callables see real query positions; folded rows get their heads' values.
        fn_q = pos_q[:1, ...] if self.folded else pos_q
        if o.bias_fn is not None:
            s = s + self.lift(self.fold(o.bias_fn(fn_q, pos_k)))
        rules = [mask_c]
        if o.mask_fn is not None:
            rules.append(self.fold(o.mask_fn(fn_q, pos_k)))
        diagonal = pos_q + (self.kv_len - self.q_len)  # bottom-right aligned
        if masked and o.right is not None:
            rules.append(pos_k <= diagonal + o.right)
        if masked and o.left is not None:
            rules.append(pos_k >= diagonal - o.left)
        if masked and self.keys.overlaps:  # the last chunk's overlap belongs to its predecessor
            rules.append(pos_k >= k_index * self.keys.size)
        if overlapping_rows and self.rows.overlaps:
            rules.append(rows >= r_index * self.rows.size)
        if self.k_lengths is not None:
            rules.append(pos_k < self.k_lengths)
        if self.q_lengths is not None:
            rules.append(pos_q < self.q_lengths)
        allowed = None
        for rule in rules:
            if rule is not None:
                allowed = rule if allowed is None else xp.logical_and(allowed, rule)
        return s if allowed is None else xp.where(allowed, s, NEG_INF)

    def needs_positions(self, masked, overlapping_rows) -> bool:
        """Whether :meth:`scores` needs the chunk's positions (a rule or a callable)."""
        o = self.options
        return (
            (masked and (o.left is not None or o.right is not None or self.keys.overlaps))
            or (overlapping_rows and self.rows.overlaps)
            or o.bias_fn is not None
            or o.mask_fn is not None
            or self.q_lengths is not None
            or self.k_lengths is not None
        )

    # -- loop bounds ---------------------------------------------------------------------
    def key_ranges(self, r_index) -> list[_Range]:
        """The key chunks row block ``r_index`` can see, as consecutive ranges: partly
        masked edges around a middle of chunks that every row sees whole."""
        xp, o, keys = self.xp, self.options, self.keys
        if self.folded:
            p_first = p_last = 0
        else:
            p_first = self.rows.start(r_index)
            p_last = p_first + self.rows.size - 1
        offset = self.kv_len - self.q_len
        lo, hi = 0, self.kv_len - 1  # inclusive key positions
        if o.left is not None:
            lo = _max(xp, lo, p_first + offset - o.left)
        if o.right is not None:
            hi = _min(xp, hi, p_last + offset + o.right)
        if self.k_max is not None:
            hi = _min(xp, hi, self.k_max - 1)
        first = _min(xp, lo // keys.size, keys.count)
        stop = _max(xp, first, (hi + keys.size) // keys.size)  # empty when hi < lo
        if self.q_max is not None:
            stop = _select(xp, p_first < self.q_max, stop, first)
        trips = keys.count
        if o.left is not None and o.right is not None:
            width = 0 if self.folded else self.rows.size - 1
            trips = min(trips, (width + o.left + o.right) // keys.size + 2)
        # Whole chunks: every key at or after the block's last diagonal - left, at or
        # before its first diagonal + right, and not the overlapping last chunk.
        whole_first = None if o.left is None else _ceil_div(p_last + offset - o.left, keys.size)
        whole_stop = keys.count - 1 if keys.overlaps else None
        if o.right is not None:
            below = (p_first + offset + o.right + 1) // keys.size
            whole_stop = below if whole_stop is None else _min(xp, whole_stop, below)
        edge_trips = min(keys.count, self.rows.size // keys.size + 2)
        return _bands(xp, first, stop, whole_first, whole_stop, trips, (edge_trips, edge_trips))

    def row_ranges(self, k_index) -> list[_Range]:
        """The row blocks that can see key chunk ``k_index``, as :meth:`key_ranges`."""
        xp, o, rows = self.xp, self.options, self.rows
        k_first = k_index * self.keys.size  # nominal: the overlap is masked out
        k_last = _min(xp, k_first + self.keys.size, self.kv_len) - 1
        offset = self.kv_len - self.q_len
        lo, hi = 0, self.q_len - 1  # inclusive query positions
        if o.right is not None:
            lo = _max(xp, lo, k_first - offset - o.right)
        if o.left is not None:
            hi = _min(xp, hi, k_last - offset + o.left)
        if self.q_max is not None:
            hi = _min(xp, hi, self.q_max - 1)
        if self.folded:  # every row is at position 0
            first, stop = 0, _select(xp, lo <= hi, rows.count, 0)
            stop = _select(xp, lo <= 0, stop, 0)
        else:
            first = _min(xp, lo // rows.size, rows.count)
            stop = _max(xp, first, (hi + rows.size) // rows.size)
        if self.k_max is not None:
            stop = _select(xp, k_first < self.k_max, stop, first)
        trips = rows.count
        if o.left is not None and o.right is not None and not self.folded:
            trips = min(trips, (self.keys.size - 1 + o.left + o.right) // rows.size + 2)
        if self.folded:  # one block of rows: nothing to split
            return [_Range(first, stop, trips, masked=True)]
        # Whole blocks: every row's window holds the whole chunk; the overlapping last
        # block (its overlap is masked in the backward) and last key chunk are never whole.
        whole_first = None if o.right is None else _ceil_div(k_last - offset - o.right, rows.size)
        whole_stop = rows.count - 1 if rows.overlaps else None
        if o.left is not None:
            above = (k_first - offset + o.left + 1) // rows.size
            whole_stop = above if whole_stop is None else _min(xp, whole_stop, above)
        if self.keys.overlaps:
            whole_stop = rows.count if whole_stop is None else whole_stop
            whole_stop = _select(xp, k_index < self.keys.count - 1, whole_stop, 0)
        edge_trips = min(rows.count, self.keys.size // rows.size + 2)
        # The overlapping last key chunk has no middle: its tail is all of its rows.
        tail_trips = trips if self.keys.overlaps else edge_trips
        return _bands(xp, first, stop, whole_first, whole_stop, trips, (edge_trips, tail_trips))

    def loop(self, step, init, splits, axis: _Axis):
        """``step(carry, index, chunks) -> (carry, y)`` over every chunk of ``axis``;
        returns the final carry and the stacked ys."""
        if axis.count == 1:  # decoding: no loop at all
            carry, y = step(init, 0, tuple(s.at(0) for s in splits))
            return carry, _map(lambda a: a[None, ...], y)

        def scan_step(carry, index, xs):
            return step(carry, index, _chunk_of(splits, iter(xs)))

        return self.backend.scan(scan_step, init, _stacked(splits), axis.count)


def forward(
    backend: Any, q, k, v, bias, mask, q_lengths, k_lengths, *, options: Options, remat=True
):
    """Attention output ``[*batch, kv_heads, groups, q_len, d_v]`` and its logsumexp.

    Both are in the accumulation dtype, float32 (float64 for float64 inputs): the caller
    rounds the output to the input dtype, and the backward's ``Δ = rowsum(dO ∘ O)`` uses
    the unrounded one (a float16 O would cost Δ 11 bits). The logsumexp
    ``[*batch, kv_heads, groups, q_len]`` is ``-inf`` on rows that see no key; those rows'
    output is 0. With ``remat`` the chunk computations are rematerialised when the
    framework differentiates them.
    """
    c = _Context(backend, q, k, q_lengths, k_lengths, options)
    xp = c.xp
    d_v = v.shape[-1]
    if c.empty:
        zero = _connected_zero(xp, c.acc_dtype, q, k, v, bias)
        out = c.zeros((*q.shape[:-1], d_v)) + zero
        return out, xp.full(q.shape[:-1], NEG_INF, dtype=c.acc_dtype, device=c.device) + zero
    q, k, v = c.lift(c.fold(q)), c.lift(k), c.lift(v)
    if k.shape[-1] == 0:
        # Zero-width keys: a zero column in q and k (the scores stay 0), so that a key
        # whose value is not finite has an entry for `isolated` to make NaN.
        q, k = (xp.concat((x, c.zeros((*x.shape[:-1], 1))), axis=-1) for x in (q, k))
    bias, mask = c.lift(c.fold(bias)), c.fold(mask)
    # Finite inputs (padding included) skip the isolating passes, which copy k and v: as
    # much memory traffic as all the rest of a decoding step.
    attend = functools.partial(_attend, c, remat=remat)
    return backend.cond_call(c.all_finite(q, k, v), attend, c.isolated, (q, k, v), (bias, mask))


def _attend(c: _Context, q, k, v, bias, mask, *, remat: bool):
    """:func:`forward` of prepared operands, finite or isolated (:meth:`_Context.isolated`)."""
    backend, options, xp = c.backend, c.options, c.xp
    d_v = v.shape[-1]

    def update(m, l, acc, q_c, k_c, v_c, bias_c, mask_c, r_index, k_index, *, masked):
        """Fold one key chunk into the running (max, sum, accumulator) of a row block;
        ``masked=False`` where the chunk is whole to every row (no structural mask)."""
        s = c.scores(q_c, k_c, bias_c, mask_c, r_index, k_index, masked)
        # The result does not depend on m, so no gradient needs to flow through it.
        m_new = xp.maximum(m, backend.stop_gradient(xp.max(s, axis=-1, keepdims=True)))
        m_ref = xp.where(m_new == NEG_INF, 0.0, m_new)  # rows that have seen no key yet
        p = backend.exp_shifted(s, m_ref)
        rescale = xp.exp(m - m_ref)
        l = l * rescale + backend.row_sums(p)
        acc = acc * rescale + xp.matmul(p, v_c)
        return m_new, l, acc

    def row_block(q_c, bias_c, mask_c, r_index, k_stack, v_stack):
        """Output and logsumexp of one block of rows against every key it can see."""
        # Scaled per block: a scaled copy of all of q would be one more n·d buffer.
        q_c = q_c * options.scale
        by_key = (_split(xp, bias_c, -1, c.keys), _split(xp, mask_c, -1, c.keys))
        rows = q_c.shape[:-1]
        # Connected to the inputs even if no key chunk is visible (no loop trip runs).
        zero = _connected_zero(xp, c.acc_dtype, q_c, k_stack[0], v_stack[0], bias_c)
        init = (
            xp.full((*rows, 1), NEG_INF, dtype=c.acc_dtype, device=c.device) + zero,
            c.zeros((*rows, 1)),
            c.zeros((*rows, d_v)) + zero,
        )

        def body(masked):
            def fold_in(j, carry):
                chunks = (k_stack[j], v_stack[j], by_key[0].at(j), by_key[1].at(j))
                return updates[masked](*carry, q_c, *chunks, r_index, j)

            return fold_in

        carry = init
        for band in c.key_ranges(r_index):
            carry = backend.fori_loop(band.lower, band.upper, body(band.masked), carry, band.trips)
        m, l, acc = carry
        seen = l != 0.0
        l_safe = xp.where(seen, l, 1.0)
        lse = xp.where(seen, m + xp.log(l_safe), NEG_INF)
        return acc / l_safe, lse[..., 0]

    updates = {masked: functools.partial(update, masked=masked) for masked in (False, True)}
    if remat:
        updates = {masked: backend.remat(fn) for masked, fn in updates.items()}
        row_block = backend.remat(row_block)
    k_stack = backend.chunks(_split(xp, k, -2, c.keys).chunks)
    v_stack = backend.chunks(_split(xp, v, -2, c.keys).chunks)

    def step(carry, r_index, chunks):
        return carry, row_block(*chunks, r_index, k_stack, v_stack)

    splits = tuple(_split(xp, x, -2, c.rows) for x in (q, bias, mask))
    _, (out, lse) = c.loop(step, (), splits, c.rows)
    out, lse = _join(xp, out, -2, c.rows), _join(xp, lse, -1, c.rows)
    return c.fold(out), c.fold(lse[..., None])[..., 0]


def backward(
    backend: Any, q, k, v, bias, mask, q_lengths, k_lengths, out, lse, d_out, d_lse, *, options
):
    """Cotangents ``(dq, dk, dv, d_bias)`` of :func:`forward`'s ``(out, lse)``.

    ``d_lse`` may be None. Each cotangent has its primal's shape and dtype; ``d_bias`` is
    None without a bias. Rows that see no key get zero gradients.
    """
    c = _Context(backend, q, k, q_lengths, k_lengths, options)
    xp = c.xp
    dtypes = (q.dtype, k.dtype, v.dtype, None if bias is None else bias.dtype)
    if c.empty:
        grads = (q, k, v, bias)
        return tuple(None if g is None else xp.zeros_like(g) for g in grads)
    q, k, v = c.lift(c.fold(q)), c.lift(k), c.lift(v)
    # Finite inputs (padding included) skip the zeroing passes, as the forward skips its
    # isolating ones; JAX branches around the whole backward, or its conditional would
    # return copies of q, k and v (n 16384: 8 MiB of 47).
    backprop = functools.partial(_backprop, c, dtypes)
    passed = (bias, mask, out, lse, d_out, d_lse)
    return backend.cond_call(c.all_finite(q, k, v), backprop, c.zeroed, (q, k, v), passed)


def _backprop(c: _Context, dtypes, q, k, v, bias, mask, out, lse, d_out, d_lse):
    """:func:`backward` of prepared operands, finite or zeroed (:meth:`_Context.zeroed`)."""
    backend, options, xp = c.backend, c.options, c.xp
    # Rows whose output is NaN (they attend a non-finite input, see _Context.isolated)
    # are constants here: they contribute nothing, so every other gradient stays exact.
    affected = xp.logical_not(xp.logical_or(xp.isfinite(lse), lse == NEG_INF))
    q = q * options.scale
    bias, mask = c.lift(c.fold(bias)), c.fold(mask)
    affected = c.fold(affected[..., None])
    d_out = xp.where(affected, 0.0, c.lift(c.fold(d_out)))
    # Δ = rowsum(dO ∘ O) as a product: XLA on CPU runs a multiply-and-sum over the last
    # axis with five n·d buffers of its own, outside what memory_analysis() reports.
    delta = xp.vecdot(d_out, c.lift(c.fold(out)))[..., None]
    if d_lse is not None:  # d lse / d S = P, so d_lse joins Δ
        delta = delta - c.fold(c.lift(d_lse)[..., None])
    delta = xp.where(affected, 0.0, delta)  # the output is NaN there
    # P = exp(S - lse) is 0 on rows that see no key (lse -inf) and on affected rows.
    lse = c.fold(lse[..., None])
    lse = xp.where(affected, float("inf"), xp.where(lse == NEG_INF, 0.0, lse))

    def chunk_grads(
        q_c, qt_c, do_c, dot_c, lse_c, delta_c, bias_c, mask_c, r, k_c, vt_c, j, masked
    ):
        """dQ of a chunk pair, and its transposed contributions dKᵀ = Qᵀ dS, dVᵀ = dOᵀ P.

        Every operand comes in the orientation its product needs (the row operands
        transposed once, outside the loops; ``vt_c`` once per key chunk), so no
        ``q_chunk x k_chunk`` block is ever transposed.
        """
        s = c.scores(q_c, k_c, bias_c, mask_c, r, j, masked, overlapping_rows=masked)
        p = backend.exp_shifted(s, lse_c)
        ds = p * (xp.matmul(do_c, vt_c) - delta_c)
        dkt = _sum_groups(xp, xp.matmul(qt_c, ds))
        dvt = _sum_groups(xp, xp.matmul(dot_c, p))
        db = None if bias_c is None else _sum_to(xp, ds, bias_c.shape)
        return xp.matmul(ds, k_c), dkt, dvt, db

    t = xp.matrix_transpose
    by_rows = tuple(
        c.indexed(_split(xp, x, axis, c.rows))
        for x, axis in ((q, -2), (t(q), -1), (d_out, -2), (t(d_out), -1), (lse, -2), (delta, -2))
    )
    bias_by_keys = bias is not None and bias.shape[-1] == c.kv_len
    bias_by_rows = bias is not None and bias.shape[-2] == c.rows.length

    def by_row_blocks(shape):
        """Zeros of ``shape`` held as one block per row block (``Backend.blocks``)."""
        return backend.blocks(c.zeros((c.rows.count, *shape[:-2], c.rows.size, shape[-1])))

    def joined_rows(blocks):
        """The array that ``by_row_blocks`` holds (each overlap counted once: it is 0)."""
        return _join(xp, backend.stacked(blocks), -2, c.rows)

    # d_bias accumulates by row blocks where the bias has rows; else it is one array.
    def d_bias_zeros(shape):
        return by_row_blocks(shape) if bias_by_rows else c.zeros(shape)

    def d_bias_value(db):
        return joined_rows(db) if bias_by_rows else db

    def key_block(k_c, v_c, bias_k, mask_k, j, dq, db):
        """dK, dV of key chunk ``j``; its contributions added to dQ and d_bias."""
        extras = (_split(xp, bias_k, -2, c.rows), _split(xp, mask_k, -2, c.rows))
        vt_c = t(v_c)  # a chunk at a time: no transposed copy of all of v
        *outer, k_chunk, d_k = k_c.shape

        def body(masked):
            def add_in(r, carry):
                dkt, dvt, dq, db = carry
                chunks = [s.at(r) for s in (*by_rows, *extras)]
                g_q, g_kt, g_vt, g_b = chunk_grads(*chunks, r, k_c, vt_c, j, masked)
                dq = backend.add_block(dq, r, g_q)
                if db is not None:
                    db = backend.add_block(db, r, g_b) if bias_by_rows else db + g_b
                return dkt + g_kt, dvt + g_vt, dq, db

            return add_in

        if bias_by_keys:  # this chunk's columns of d_bias
            db = d_bias_zeros((*bias_k.shape[:-1], k_chunk))
        carry = (c.zeros((*outer, d_k, k_chunk)), c.zeros(vt_c.shape), dq, db)
        for band in c.row_ranges(j):
            carry = backend.fori_loop(band.lower, band.upper, body(band.masked), carry, band.trips)
        dkt, dvt, dq, db = carry
        if bias_by_keys:
            db = d_bias_value(db)
        return t(dkt), t(dvt), dq, db

    def step(carry, j, chunks):
        dq, db = carry
        dk, dv, dq, db = key_block(*chunks, j, dq, db)
        return (dq, None if bias_by_keys else db), (dk, dv, db if bias_by_keys else None)

    splits = [_split(xp, x, -2, c.keys) for x in (k, v)]
    splits += [_split(xp, x, -1, c.keys) for x in (bias, mask)]
    db = None if bias is None or bias_by_keys else d_bias_zeros(bias.shape)
    (dq, db), (dk, dv, db_by_keys) = c.loop(step, (by_row_blocks(q.shape), db), splits, c.keys)
    dq, dk, dv = joined_rows(dq), _join(xp, dk, -2, c.keys), _join(xp, dv, -2, c.keys)
    if bias_by_keys:
        db = _join(xp, db_by_keys, -1, c.keys)
    elif bias is not None:
        db = d_bias_value(db)
    grads = (c.fold(dq) * options.scale, dk, dv, c.fold(db))
    return tuple(None if g is None else xp.astype(g, d) for g, d in zip(grads, dtypes, strict=True))


def differentiable(backend: Any, present: tuple[bool, ...], forward, backward):
    """``f(q, k, v, *given) -> (out, lse)`` whose gradient is ``backward``, registered with
    the framework through the adapter's ``custom_vjp``.

    ``present`` says which of (bias, mask, q_lengths, k_lengths) are among ``given``.
    ``forward(q, k, v, bias, mask, q_lengths, k_lengths)`` and ``backward(<the same>,
    out, lse, d_out, d_lse)`` are this module's :func:`forward` (without remat) and
    :func:`backward` with their options bound, staged by the backend together with the
    layout changes to and from the user's layout (:mod:`uniattn._api`).
    """

    def unpack(args):
        q, k, v, *given = args
        given = iter(given)  # not list.pop: a tracer may take a starred target for a tuple
        return q, k, v, *(next(given) if p else None for p in present)

    def fwd(*args):
        out, lse = forward(*unpack(args))
        return (out, lse), (args, out, lse)

    def bwd(residuals, cotangents):
        args, out, lse = residuals
        dq, dk, dv, db = backward(*unpack(args), out, lse, *cotangents)
        others = (db,) * present[0] + (None,) * sum(present[1:])  # no gradient: mask, lengths
        return (dq, dk, dv, *others)

    return backend.custom_vjp(fwd, bwd)


@dataclass(frozen=True)
class _Split:
    """An operand cut along one axis: ``chunks`` stacks them on a new leading axis.

    An operand that is None or broadcast along the axis (extent 1 where the length is
    not) is kept ``whole`` for every chunk.
    """

    chunks: Any = None
    whole: Any = None

    def at(self, index):
        """The operand's value in chunk ``index``."""
        return self.whole if self.chunks is None else self.chunks[index]


def _split(xp, x, axis: int, cut: _Axis) -> _Split:
    """Cut ``x`` along ``axis`` into ``cut``'s chunks (a broadcast extent 1 is not cut)."""
    if x is None or x.shape[axis] != cut.length:
        return _Split(whole=x)
    axis = x.ndim + axis
    full = cut.length // cut.size * cut.size
    head = _slice_axis(x, axis, 0, full)
    head = xp.reshape(head, (*x.shape[:axis], full // cut.size, cut.size, *x.shape[axis + 1 :]))
    chunks = xp.permute_dims(head, (axis, *range(axis), *range(axis + 1, head.ndim)))
    if cut.overlaps:
        last = _slice_axis(x, axis, cut.length - cut.size, cut.length)
        chunks = xp.concat((chunks, last[None, ...]), axis=0)
    return _Split(chunks=chunks)


def _slice_axis(x, axis: int, start: int, stop: int):
    return x[(slice(None),) * axis + (slice(start, stop),)]


def _stacked(splits) -> tuple:
    """The stacked chunks of the operands that are cut, to scan over."""
    return tuple(s.chunks for s in splits if s.chunks is not None)


def _chunk_of(splits, chunks) -> tuple:
    """Each operand's value in one scan step, given that step's slices of ``_stacked``."""
    return tuple(s.whole if s.chunks is None else next(chunks) for s in splits)


def _join(xp, stacked, axis: int, cut: _Axis):
    """Per-chunk outputs stacked on axis 0, as one array of ``cut.length`` along ``axis``
    (the overlapped start of the last chunk is dropped)."""
    if stacked is None:  # an output that does not exist (no bias: no d_bias)
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


def _connected_zero(xp, dtype, *arrays):
    """A 0 that depends on every given array (a sum of empty slices: exactly 0, never NaN),
    so that a result it is added to stays differentiable (zero gradients, not an error)
    where no loop trip ran: empty inputs, or every key masked by lengths."""
    return sum(xp.sum(xp.astype(x[..., :0], dtype)) for x in arrays if x is not None)


def _finite_rows(xp, x):
    """Whether each row of ``x`` is finite: its largest magnitude is below inf (a NaN
    makes the maximum NaN). One reduction, which XLA fuses with the ``abs``; ``all(
    isfinite(x))`` materialised a boolean copy of ``x`` first (decoding from a 32k cache:
    107 -> 90 ms)."""
    if x.shape[-1] == 0:  # an empty row is finite (a maximum of nothing is an error)
        return xp.all(xp.isfinite(x), axis=-1, keepdims=True)
    return xp.max(xp.abs(x), axis=-1, keepdims=True) < float("inf")


def _isolate_rows(xp, q):
    """Query rows with a non-finite entry, all NaN (see :meth:`_Context.isolated`)."""
    return xp.where(_finite_rows(xp, q), q, NAN)


def _isolate_non_finite_keys(xp, k, v):
    """NaN keys where k or v has a non-finite entry, and such values 0."""
    key_ok = xp.logical_and(_finite_rows(xp, k), _finite_rows(xp, v))
    return xp.where(key_ok, k, NAN), xp.where(key_ok, v, 0.0)


def _zero_non_finite(xp, *arrays):
    return tuple(xp.where(xp.isfinite(x), x, 0.0) for x in arrays)


def _sum_groups(xp, x):
    """Sum over the query heads of each key/value head: ``[.., groups, t, d] -> [.., 1, t, d]``."""
    return xp.sum(x, axis=-3, keepdims=True) if x.shape[-3] != 1 else x


def _sum_to(xp, x, shape):
    """Sum ``x`` over the axes along which an array of ``shape`` (same rank) broadcasts."""
    axes = tuple(i for i, (n, m) in enumerate(zip(shape, x.shape, strict=True)) if n == 1 != m)
    return xp.sum(x, axis=axes, keepdims=True) if axes else x


def _map(fn, tree):
    return tuple(None if a is None else fn(a) for a in tree) if isinstance(tree, tuple) else tree


@dataclass(frozen=True)
class _Range:
    """Chunks ``lower:upper`` of an inner loop (at most ``trips``); ``masked`` says whether
    they need the structural mask (see :meth:`_Context.scores`)."""

    lower: Any
    upper: Any
    trips: int
    masked: bool


def _bands(xp, first, stop, whole_first, whole_stop, trips, edge_trips) -> list[_Range]:
    """``first:stop`` cut into a masked head, a whole middle ``whole_first:whole_stop``
    (clipped to ``first:stop``) and a masked tail; None for either bound: no head, no tail.
    ``trips`` bounds the middle's length, ``edge_trips`` the head's and the tail's."""
    mid_first = first if whole_first is None else _min(xp, _max(xp, whole_first, first), stop)
    mid_stop = stop if whole_stop is None else _min(xp, _max(xp, whole_stop, mid_first), stop)
    bands = [
        _Range(first, mid_first, edge_trips[0], masked=True),
        _Range(mid_first, mid_stop, trips, masked=False),
        _Range(mid_stop, stop, edge_trips[1], masked=True),
    ]
    return [b for b in bands if not _same(b.lower, b.upper)]


def _same(a, b) -> bool:
    """Whether two loop bounds are known to be equal without evaluating an array."""
    return a is b or (isinstance(a, int) and isinstance(b, int) and a == b)


def _ceil_div(a, b: int):
    return -(-a // b)


# Loop bounds are Python ints where the loop index is one (eager loops) and 0-d int arrays
# where it is traced or comes from a lengths array; these keep ints as ints.
def _min(xp, a, b):
    if isinstance(a, int) and isinstance(b, int):
        return min(a, b)
    a, b = (b, a) if isinstance(a, int) else (a, b)
    return xp.clip(a, max=b) if isinstance(b, int) else xp.minimum(a, b)


def _max(xp, a, b):
    if isinstance(a, int) and isinstance(b, int):
        return max(a, b)
    a, b = (b, a) if isinstance(a, int) else (a, b)
    return xp.clip(a, min=b) if isinstance(b, int) else xp.maximum(a, b)


def _select(xp, condition, a, b):
    if isinstance(condition, bool):
        return a if condition else b
    return xp.where(condition, a, b)
