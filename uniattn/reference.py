"""The float64 NumPy reference: plain attention with the full score matrix.

This is the oracle of the conformance suite. It is written for clarity, not memory: it
materialises ``[*batch, heads, q_len, kv_len]`` scores and repeats grouped key/value
heads. Gradients are the analytic ones, in float64.

Non-finite inputs follow uniattn's rule: a NaN or inf in a query, key or value turns NaN
exactly the output rows that attend it; the gradients treat those rows as constants.
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
    scale=None,
    layout="BTHD",
    return_lse=False,
):
    """Reference output in float64 (and the logsumexp ``[*batch, heads, q_len]``).

    Takes :func:`uniattn.attention`'s semantic arguments; a callable ``bias`` or ``mask``
    is called once with every position (NumPy int arrays ``[q_len, 1]``, ``[1, kv_len]``).
    """
    rules = _Rules(bias, mask, causal, window, query_lengths, key_lengths)
    out, _probs, lse = _forward(query, key, value, rules, scale, layout)
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
    scale=None,
    layout="BTHD",
) -> Gradients:
    """Reference gradients of ``sum(attention(...) * d_out)``, in float64 (``d_bias`` only
    for an array ``bias``)."""
    q, k, v, groups = _to_bhtd(query, key, value, layout)
    s_scale = _scale(scale, q.shape[-1])
    rules = _Rules(bias, mask, causal, window, query_lengths, key_lengths)
    out, p, _ = _forward(query, key, value, rules, scale, layout)
    # Rows that attend a non-finite input (NaN output) are constants: they contribute 0.
    affected = np.any(np.isnan(out), axis=-1, keepdims=True)
    p = np.where(affected, 0.0, p)
    q, k, v = (np.where(np.isfinite(x), x, 0.0) for x in (q, k, v))
    d_o = _from_bhtd(np.asarray(d_out, np.float64), layout)  # the swap is its own inverse
    d_o = np.where(affected, 0.0, d_o)
    k_rep, v_rep = np.repeat(k, groups, axis=-3), np.repeat(v, groups, axis=-3)
    dv = _sum_groups(np.swapaxes(p, -1, -2) @ d_o, groups)
    dp = d_o @ np.swapaxes(v_rep, -1, -2)
    ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True))  # softmax backward
    dq = s_scale * ds @ k_rep
    dk = _sum_groups(s_scale * np.swapaxes(ds, -1, -2) @ q, groups)
    d_bias = None if bias is None or callable(bias) else _reduce_to(ds, np.shape(bias))
    return Gradients(*(_from_bhtd(g, layout) for g in (dq, dk, dv)), d_bias)


@dataclass(frozen=True)
class _Rules:
    bias: object
    mask: object
    causal: bool
    window: tuple | None
    query_lengths: object
    key_lengths: object

    def apply(self, s):
        """Scores ``s [*batch, heads, q_len, kv_len]`` with bias added; the allowed mask."""
        q_len, kv_len = s.shape[-2:]
        i, j = np.arange(q_len)[:, None], np.arange(kv_len)[None, :]
        bias, mask = (f(i, j) if callable(f) else f for f in (self.bias, self.mask))
        if bias is not None:
            s = s + np.asarray(bias, np.float64)
        allowed = np.ones(s.shape, dtype=bool)
        if mask is not None:
            allowed &= np.asarray(mask, bool)
        diagonal = i + (kv_len - q_len)
        if self.causal:
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
        return s, allowed


def _forward(query, key, value, rules, scale, layout):
    q, k, v, groups = _to_bhtd(query, key, value, layout)
    q, k, v, rows_ok, keys_ok = _isolated(q, k, v)
    k, v = np.repeat(k, groups, axis=-3), np.repeat(v, groups, axis=-3)
    keys_ok = np.swapaxes(np.repeat(keys_ok, groups, axis=-3), -1, -2)
    with np.errstate(invalid="ignore"):
        s, allowed = rules.apply(_scale(scale, q.shape[-1]) * (q @ np.swapaxes(k, -1, -2)))
    s = np.where(rows_ok & keys_ok, s, np.nan)
    s = np.where(allowed, s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True, initial=-np.inf)
    m = np.where(np.isneginf(m), 0.0, m)
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.where(allowed, np.exp(s - m), 0.0)
        total = np.sum(e, axis=-1, keepdims=True)
        seen = total > 0
        p = e / np.where(seen, total, 1.0)
        with np.errstate(divide="ignore"):
            lse = np.where(seen | np.isnan(total), m + np.log(np.where(seen, total, 1.0)), -np.inf)
        out = p @ v
    return out, p, lse[..., 0]


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
