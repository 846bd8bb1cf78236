"""The float64 NumPy reference: plain attention with the full score matrix.

This is the oracle of the conformance suite. It is written for clarity, not memory: it
materialises ``[*batch, heads, q_len, kv_len]`` scores and repeats grouped key/value
heads. Gradients are the analytic ones, in float64.

Non-finite inputs follow uniattn's rule: a NaN or inf in a query, key or value turns NaN
exactly the output rows that attend it; the gradients treat those rows as constants.

:func:`dropout_keep` is the statement of uniattn's dropout mask: a 32-bit integer hash of
the seed, the flattened batch index, the query head and the query and key positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Gradients:
    """Reference cotangents; ``d_bias`` has the shape of the bias given (None if none)."""

    dq: np.ndarray
    dk: np.ndarray
    dv: np.ndarray
    d_bias: np.ndarray | None
    d_sinks: np.ndarray | None = None


def attention(
    query,
    key,
    value,
    *,
    bias=None,
    mask=None,
    causal=False,
    window=None,
    query_lengths=None,
    key_lengths=None,
    segment_ids=None,
    sinks=None,
    softcap=None,
    dropout_rate=0.0,
    dropout_seed=None,
    scale=None,
    layout="BTHD",
    return_lse=False,
):
    """Reference output in float64 (and the logsumexp ``[*batch, heads, q_len]``).

    Takes :func:`uniattn.attention`'s semantic arguments; a callable ``bias`` or ``mask``
    is called once with every position (NumPy int arrays ``[q_len, 1]``, ``[1, kv_len]``).
    """
    rules = _Rules(bias, mask, causal, window, query_lengths, key_lengths, segment_ids, softcap)
    dropout = _Dropout(dropout_rate, dropout_seed)
    out, _probs, lse, _t = _forward(query, key, value, rules, scale, layout, sinks, dropout)
    out = _from_bhtd(out, layout)
    return (out, lse) if return_lse else out


def vjp(
    query,
    key,
    value,
    d_out,
    *,
    bias=None,
    mask=None,
    causal=False,
    window=None,
    query_lengths=None,
    key_lengths=None,
    segment_ids=None,
    sinks=None,
    softcap=None,
    dropout_rate=0.0,
    dropout_seed=None,
    scale=None,
    layout="BTHD",
) -> Gradients:
    """Reference gradients of ``sum(attention(...) * d_out)``, in float64 (``d_bias`` only
    for an array ``bias``, ``d_sinks`` only with ``sinks``)."""
    q, k, v, groups = _to_bhtd(query, key, value, layout)
    s_scale = _scale(scale, q.shape[-1])
    rules = _Rules(bias, mask, causal, window, query_lengths, key_lengths, segment_ids, softcap)
    dropout = _Dropout(dropout_rate, dropout_seed)
    out, p, lse, t = _forward(query, key, value, rules, scale, layout, sinks, dropout)
    # Rows that attend a non-finite input (NaN output) are constants: they contribute 0.
    affected = np.any(np.isnan(out), axis=-1, keepdims=True)
    p = np.where(affected, 0.0, p)
    q, k, v = (np.where(np.isfinite(x), x, 0.0) for x in (q, k, v))
    d_o = _from_bhtd(np.asarray(d_out, np.float64), layout)  # the swap is its own inverse
    d_o = np.where(affected, 0.0, d_o)
    k_rep, v_rep = np.repeat(k, groups, axis=-3), np.repeat(v, groups, axis=-3)
    kept = dropout.scaled_keep(p.shape)
    dv = _sum_groups(np.swapaxes(p * kept, -1, -2) @ d_o, groups)
    dp = (d_o @ np.swapaxes(v_rep, -1, -2)) * kept
    delta = np.sum(dp * p, axis=-1, keepdims=True)
    ds = p * (dp - delta)  # softmax backward (the sink's value is 0)
    d_raw = ds if t is None else ds * (1.0 - t * t)  # through softcap's tanh
    dq = s_scale * d_raw @ k_rep
    dk = _sum_groups(s_scale * np.swapaxes(d_raw, -1, -2) @ q, groups)
    d_bias = None if bias is None or callable(bias) else _reduce_to(ds, np.shape(bias))
    d_sinks = None
    if sinks is not None:
        # d L / d sink = p_sink, and out depends on L alone: d sink = -sum_i p_sink Δ_i
        p_sink = np.exp(_sink_logits(sinks, p.shape) - lse[..., None])
        p_sink = np.where(affected | np.isnan(p_sink), 0.0, p_sink)
        d_sinks = _reduce_to(-np.sum(p_sink * delta, axis=(-2, -1)), np.shape(sinks))
    grads = (_from_bhtd(g, layout) for g in (dq, dk, dv))
    return Gradients(*grads, d_bias, d_sinks)


def dropout_keep(seed, rate: float, shape) -> np.ndarray:
    """uniattn's dropout mask: True where a probability is kept, ``[*batch, heads, q_len,
    kv_len]`` (``shape``).

    With ``fmix(h)`` MurmurHash3's 32-bit finaliser and every operation on unsigned 32-bit
    integers (products modulo 2**32, ``>>`` logical)::

        row(b, h, i) = fmix(fmix(fmix(fmix(seed ^ 0x243F6A88) ^ b) ^ h) ^ i)
        col(j)       = fmix(j ^ 0x85A308D3)
        x            = (row ^ col) * 0x9E3779B1
        keep         = (x ^ 0x80000000) >= ceil(rate * 2**32)

    (The top bit flipped: read as a signed 32-bit integer, ``x`` is compared with
    ``ceil(rate * 2**32) - 2**31``, which is how every framework's int32 computes it, in one
    comparison.)

    ``seed`` is taken modulo 2**32; ``b`` is the flattened index of the batch axes, ``h``
    the query head, ``i`` and ``j`` the absolute query and key positions (bottom-right or
    not, they are array indices). The mask depends on nothing else: not on chunk sizes,
    layout or backend.
    """
    *batch, heads, q_len, kv_len = shape
    u32 = np.uint32
    b = np.arange(math.prod(batch), dtype=u32).reshape(*batch, 1, 1, 1)
    h = np.arange(heads, dtype=u32).reshape(heads, 1, 1)
    i = np.arange(q_len, dtype=u32).reshape(q_len, 1)
    j = np.arange(kv_len, dtype=u32).reshape(1, kv_len)
    with np.errstate(over="ignore"):
        row = _fmix(u32(int(seed) % 2**32) ^ u32(0x243F6A88))
        row = _fmix(_fmix(_fmix(row ^ b) ^ h) ^ i)
        x = (row ^ _fmix(j ^ u32(0x85A308D3))) * u32(0x9E3779B1)
    return (x ^ u32(0x80000000)) >= math.ceil(rate * 2**32)


def _fmix(h):
    """MurmurHash3's 32-bit finaliser on uint32 arrays."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


@dataclass(frozen=True)
class _Dropout:
    rate: float
    seed: object

    def scaled_keep(self, shape):
        """Kept entries' factor ``1 / (1 - rate)``, dropped ones 0 (1 everywhere at rate 0)."""
        if not self.rate:
            return np.ones((), np.float64)
        return dropout_keep(self.seed, self.rate, shape) / (1.0 - self.rate)


def _sink_logits(sinks, shape):
    """Sinks ``[*batch, heads]`` (broadcastable) as ``[*batch, heads, 1, 1]`` float64."""
    sinks = np.asarray(sinks, np.float64)
    return np.broadcast_to(sinks, shape[:-2])[..., None, None]


@dataclass(frozen=True)
class _Rules:
    bias: object
    mask: object
    causal: object
    window: tuple | None
    query_lengths: object
    key_lengths: object
    segment_ids: object = None
    softcap: float | None = None

    def apply(self, s):
        """Scaled scores ``s [*batch, heads, q_len, kv_len]`` soft-capped, with the bias
        added; the allowed mask; and the tanh of the soft cap (None without one)."""
        q_len, kv_len = s.shape[-2:]
        i, j = np.arange(q_len)[:, None], np.arange(kv_len)[None, :]
        t = None
        if self.softcap is not None:
            t = np.tanh(s / self.softcap)
            s = self.softcap * t
        bias, mask = (f(i, j) if callable(f) else f for f in (self.bias, self.mask))
        if bias is not None:
            s = s + np.asarray(bias, np.float64)
        allowed = np.ones(s.shape, dtype=bool)
        if mask is not None:
            allowed &= np.asarray(mask, bool)
        diagonal = i + (kv_len - q_len)
        if self.causal == "top_left":
            allowed &= j <= i
        elif self.causal:
            allowed &= j <= diagonal
        left, right = self.window or (None, None)
        if left is not None:
            allowed &= j >= diagonal - left
        if right is not None:
            allowed &= j <= diagonal + right
        batch = s.shape[:-3]
        if self.query_lengths is not None:
            allowed &= i < np.reshape(self.query_lengths, (*batch, 1, 1, 1))
        if self.key_lengths is not None:
            allowed &= j < np.reshape(self.key_lengths, (*batch, 1, 1, 1))
        if self.segment_ids is not None:
            ids = self.segment_ids
            q_ids, kv_ids = ids if isinstance(ids, (tuple, list)) else (ids, ids)
            q_ids = np.asarray(q_ids).reshape(*batch, 1, q_len, 1)
            kv_ids = np.asarray(kv_ids).reshape(*batch, 1, 1, kv_len)
            allowed &= (q_ids == kv_ids) & (q_ids >= 0)
        return s, allowed, t


def _forward(query, key, value, rules, scale, layout, sinks=None, dropout=None):
    q, k, v, groups = _to_bhtd(query, key, value, layout)
    q, k, v, rows_ok, keys_ok = _isolated(q, k, v)
    k, v = np.repeat(k, groups, axis=-3), np.repeat(v, groups, axis=-3)
    keys_ok = np.swapaxes(np.repeat(keys_ok, groups, axis=-3), -1, -2)
    with np.errstate(invalid="ignore"):
        raw = _scale(scale, q.shape[-1]) * (q @ np.swapaxes(k, -1, -2))
        s, allowed, t = rules.apply(raw)
    s = np.where(rows_ok & keys_ok, s, np.nan)
    s = np.where(allowed, s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True, initial=-np.inf)
    if sinks is not None:
        sink = _sink_logits(sinks, s.shape)  # [*batch, heads, 1, 1]
        m = np.maximum(m, np.where(np.isnan(m), m, sink))
    m = np.where(np.isneginf(m), 0.0, m)
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.where(allowed, np.exp(s - m), 0.0)
        total = np.sum(e, axis=-1, keepdims=True)
        if sinks is not None:
            total = total + np.exp(sink - m)
        seen = total > 0
        p = e / np.where(seen, total, 1.0)
        with np.errstate(divide="ignore"):
            lse = np.where(seen | np.isnan(total), m + np.log(np.where(seen, total, 1.0)), -np.inf)
        kept = np.ones(()) if dropout is None else dropout.scaled_keep(p.shape)
        out = (p * kept) @ v
    return out, p, lse[..., 0], t


def _isolated(q, k, v):
    """Queries, keys and values with every non-finite entry 0, and which query rows
    ``[..., q_len, 1]`` and keys ``[..., kv_len, 1]`` had none: a query row or key
    (key or value) with a NaN or inf entry gets NaN scores, which turn NaN exactly the rows
    that attend it (zero-width keys included); its value, 0, leaves the others unaffected."""

    def finite(x):
        return np.all(np.isfinite(x), axis=-1, keepdims=True)

    rows_ok, keys_ok = finite(q), finite(k) & finite(v)
    zeroed = (np.where(np.isfinite(x), x, 0.0) for x in (q, k, v))
    return (*zeroed, rows_ok, keys_ok)


def _scale(scale, d_k):
    return (1.0 / math.sqrt(d_k) if d_k else 1.0) if scale is None else float(scale)


def _to_bhtd(query, key, value, layout):
    q, k, v = (np.asarray(x, np.float64) for x in (query, key, value))
    if layout == "BTHD":
        q, k, v = (np.swapaxes(x, -3, -2) for x in (q, k, v))
    return q, k, v, q.shape[-3] // k.shape[-3]


def _from_bhtd(x, layout):
    return np.swapaxes(x, -3, -2) if layout == "BTHD" else x


def _sum_groups(x, groups):
    """[*b, heads, t, d] -> [*b, kv_heads, t, d], summing the query heads of each group."""
    *batch, heads, t, d = x.shape
    return x.reshape(*batch, heads // groups, groups, t, d).sum(axis=-3)


def _reduce_to(x, shape):
    """Sum ``x`` over the axes along which an array of ``shape`` was broadcast to it."""
    lead = x.ndim - len(shape)
    x = x.sum(axis=tuple(range(lead))) if lead else x
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return x.sum(axis=axes, keepdims=True) if axes else x
