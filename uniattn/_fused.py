"""A call as a framework's fused attention kernel would take it (``implementation``).

The frameworks' fused kernels (torch's ``scaled_dot_product_attention``, JAX's cuDNN
attention) compute softmax attention with a narrower set of options than uniattn, and some
with other semantics: top-left causal alignment, NaN or the mean of the values for a row
that sees no key, no bias gradient, no logsumexp. :func:`describe` reduces a checked call
to what such a kernel takes, a :class:`FusedCall`, or names the first of its options none
of them computes exactly; the adapter (``Backend.fused``) then decides whether its
framework's kernel takes the rest, on the arrays' device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Values of the ``implementation`` keyword.
IMPLEMENTATIONS = (None, "chunked", "fused")


@dataclass(frozen=True)
class FusedCall:
    """The static description of a call that a fused kernel may compute.

    ``causal`` is None (every row sees every key, up to ``mask`` and ``bias``),
    ``"top_left"`` (query ``i`` sees keys ``j <= i``) or ``"bottom_right"`` (``j <= i +
    kv_len - q_len``, with ``q_len < kv_len``: every row sees a key). ``bias`` and ``mask``
    say whether that array is given (at most one is, and never with ``causal``); ``vjp``
    whether ``uniattn.vjp`` asks for every gradient, the bias's included. ``reason`` names
    the first option of the call that no fused kernel computes exactly (None: none).
    """

    layout: str
    scale: float
    causal: str | None
    batch: tuple[int, ...]
    q_len: int
    kv_len: int
    heads: int
    kv_heads: int
    d_k: int
    d_v: int
    dtype: str
    bias: bool
    mask: bool
    vjp: bool
    reason: str | None


def describe(call: Any, vjp: bool) -> FusedCall:
    """The :class:`FusedCall` of a checked call (:class:`uniattn._arguments.Call`)."""
    from ._arguments import unpack

    arrays, o = call.arrays, call.options
    q, k, v = arrays.q, arrays.k, arrays.v
    q_len, heads, d_k = unpack(tuple(q.shape), call.layout)
    kv_len, kv_heads, _ = unpack(tuple(k.shape), call.layout)
    d_v = v.shape[-1]
    batch = tuple(q.shape[:-3])
    causal, causal_reason = _causal(o.left, o.right, q_len, kv_len)
    reason = _first_reason(call, causal, causal_reason, batch, (q_len, kv_len, heads, d_k, d_v))
    return FusedCall(
        layout=call.layout,
        scale=o.scale,
        causal=causal,
        batch=batch,
        q_len=q_len,
        kv_len=kv_len,
        heads=heads,
        kv_heads=kv_heads,
        d_k=d_k,
        d_v=d_v,
        dtype=call.backend.dtype_name(q),
        bias=arrays.bias is not None,
        mask=arrays.mask is not None,
        vjp=vjp,
        reason=reason,
    )


def _first_reason(call, causal, causal_reason, batch, sizes) -> str | None:
    """The first option of ``call``, in the order of ``attention``'s keywords, that no fused
    kernel computes exactly."""
    arrays, o = call.arrays, call.options
    if o.bias_fn is not None or o.mask_fn is not None:
        which = "bias" if o.bias_fn is not None else "mask"
        return f"a callable {which} is evaluated per chunk; the fused kernels take arrays"
    if arrays.bias is not None and arrays.mask is not None:
        return "a bias and a mask together: the fused kernels take one additive mask"
    if causal_reason is not None:
        return causal_reason
    if causal is not None and (arrays.bias is not None or arrays.mask is not None):
        which = "bias" if arrays.bias is not None else "mask"
        return f"causal with a {which}: the fused kernels take either a causal flag or one mask"
    if arrays.q_lengths is not None or arrays.k_lengths is not None:
        return (
            "query_lengths / key_lengths: padded rows must give 0, which the fused kernels "
            "do not guarantee"
        )
    if arrays.q_ids is not None:
        return "segment_ids: the fused kernels take no packed sequences"
    if arrays.sinks is not None:
        return "sinks: the fused kernels have no attention sinks"
    if o.softcap is not None:
        return "softcap: the fused kernels do not soft-cap the scores"
    if o.dropout_rate:
        return (
            "dropout: uniattn's mask is a hash of positions, the same on every backend; the "
            "fused kernels draw their own"
        )
    if call.backward != "custom":
        return (
            "backward='autodiff' differentiates uniattn's chunked loops (forward mode, higher "
            "orders); a fused kernel has its own backward"
        )
    if call.return_lse:
        return "return_lse=True: the fused kernels return no logsumexp"
    if 0 in batch or 0 in sizes:
        return "zero-size inputs: uniattn's zeros are not every fused kernel's"
    return None


def _causal(left, right, q_len, kv_len) -> tuple[str | None, str | None]:
    """``(causal, reason)`` of the bounds a call's causal and window options leave: query
    ``i`` sees keys ``i + kv_len - q_len - left <= j <= i + kv_len - q_len + right``."""
    if left is not None and left < kv_len - 1:  # some row's window starts after key 0
        return None, "window: the fused kernels have no sliding window"
    if right is None or right >= q_len - 1:  # row 0, the most restricted, sees every key
        return None, None
    offset = kv_len - q_len + right  # row i sees keys j <= i + offset
    if offset < 0:
        return None, (
            f"the first {-offset} query rows see no key (causal with q_len > kv_len): uniattn "
            "gives them 0; the fused kernels' causal masks are top-left, and some give NaN "
            "or the mean of the values on such rows"
        )
    if offset == 0:
        return "top_left", None
    if right == 0:
        return "bottom_right", None
    return None, "window: the fused kernels have no sliding window"


def all_finite(xp, *arrays):
    """Whether every entry of ``arrays`` (Nones left out) is finite, as a 0-d bool.

    The fused kernels let a non-finite key or value reach rows that do not attend it (0
    times NaN), where uniattn gives NaN exactly to the rows that attend it; such inputs
    take the chunked algorithm. One sum per array, in float32 or float64 (a float16 sum of
    finite values overflows early); a finite sum that overflows only costs that branch.
    """
    total = 0
    for x in arrays:
        if x is not None:
            wide = xp.float64 if x.dtype == xp.float64 else xp.float32
            total = total + xp.sum(x, dtype=wide)
    return xp.isfinite(total)
