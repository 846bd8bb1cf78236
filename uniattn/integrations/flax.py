"""uniattn as the ``attention_fn`` of Flax's attention modules.

>>> from uniattn.integrations.flax import attention_fn
>>> layer = flax.linen.MultiHeadDotProductAttention(num_heads=8, attention_fn=attention_fn)  # doctest: +SKIP
>>> layer = flax.nnx.MultiHeadAttention(8, 512, attention_fn=attention_fn, rngs=rngs)  # doctest: +SKIP

Importing this module imports JAX; Flax itself is never imported (the modules only call
the function).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

import uniattn

__all__ = ["attention_fn"]


def attention_fn(
    query: Any,
    key: Any,
    value: Any,
    bias: Any = None,
    mask: Any = None,
    broadcast_dropout: bool = True,
    dropout_rng: Any = None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype: Any = None,
    precision: Any = None,
    module: Any = None,
    *,
    force_fp32_for_softmax: bool = False,
    einsum_dot_general: Any = None,
    qk_attn_weights_einsum: Any = None,
    attn_weights_value_einsum: Any = None,
    is_causal: bool = False,
) -> Any:
    """Flax's ``dot_product_attention``, computed by :func:`uniattn.attention`.

    Pass it as ``attention_fn=`` to ``flax.linen.MultiHeadDotProductAttention`` (which
    hands over only the keywords named here) or ``flax.nnx.MultiHeadAttention``, or call
    it as Flax's function. The positional parameters are those of
    ``flax.linen.dot_product_attention``; the rest are keyword-only.

    Parameters
    ----------
    query : jax.Array, shape ``[*batch, q_len, heads, d_k]``
    key : jax.Array, shape ``[*batch, kv_len, kv_heads, d_k]``
        ``heads`` a multiple of ``kv_heads`` (``nnx.MultiHeadAttention(num_kv_heads=)``);
        the kv heads are never repeated.
    value : jax.Array, shape ``[*batch, kv_len, kv_heads, d_v]``
    bias : jax.Array, optional
        Added to the scaled scores; broadcastable to ``[*batch, heads, q_len, kv_len]``.
    mask : jax.Array, optional
        Broadcastable like ``bias``; a key is attended where it is True (or non-zero, as
        the float masks of ``flax.linen.make_attention_mask``), masked where False.
    broadcast_dropout : bool
        Must be False when dropout is active: uniattn draws an independent mask for each
        batch element and head, and does not share one across them as Flax's default
        does (construct the module with ``broadcast_dropout=False``).
    dropout_rng : jax PRNG key, optional
        Dropout's randomness; the 32-bit seed of uniattn's dropout is drawn from it, so
        the same key gives the same mask (not Flax's mask: the generators differ).
    dropout_rate : float
    deterministic : bool
        True: no dropout.
    dtype : dtype, optional
        The computation's dtype: query, key and value are cast to it (default: their
        promoted dtype). Scores accumulate in float32 (float64 for float64) whatever it
        is, so ``force_fp32_for_softmax`` is always in effect.
    precision : None or "default"
        uniattn's products follow JAX's default matmul precision: set it for the whole
        computation with ``jax.default_matmul_precision`` rather than per call. Other
        values raise.
    module : Flax module, optional
        Given by the modules when called with ``sow_weights=True``, which asks for the
        attention weights: uniattn never forms them, so this raises.
    force_fp32_for_softmax : bool
        Accepted; see ``dtype``.
    einsum_dot_general, qk_attn_weights_einsum, attn_weights_value_einsum : None
        Flax's hooks for replacing its einsums (quantised einsums): uniattn has no
        einsum to replace, so anything but None raises.
    is_causal : bool
        Query ``i`` attends key ``j`` only if ``j <= i`` (aligned to the top left, as
        nnx's default attention); combines with ``mask``.

    Returns
    -------
    jax.Array, shape ``[*batch, q_len, heads, d_v]``
        A row whose mask admits no key gives the mean of the values over all keys, as
        Flax's attention does (its scores are all equally large and negative), not
        :func:`uniattn.attention`'s zero.

    Raises
    ------
    ValueError
        ``broadcast_dropout=True`` with active dropout, active dropout without
        ``dropout_rng``, a non-default ``precision``, a ``module`` (``sow_weights``), an
        einsum hook; and whatever :func:`uniattn.attention` raises.
    """
    if module is not None:
        raise ValueError(
            "uniattn's attention_fn cannot sow the attention weights (sow_weights=True): it "
            "never forms them; call the module with sow_weights=False, or use Flax's "
            f"default attention_fn for introspection (got module={type(module).__name__})"
        )
    for name, hook in (
        ("einsum_dot_general", einsum_dot_general),
        ("qk_attn_weights_einsum", qk_attn_weights_einsum),
        ("attn_weights_value_einsum", attn_weights_value_einsum),
    ):
        if hook is not None:
            raise ValueError(
                f"uniattn's attention_fn has no einsum to replace: {name} must be None; "
                f"got {hook!r}"
            )
    if not _is_default_precision(precision):
        raise ValueError(
            "uniattn's attention_fn follows JAX's default matmul precision: precision must "
            "be None or 'default' (set jax.default_matmul_precision around the computation "
            f"instead); got precision={precision!r}"
        )
    dtype = jnp.result_type(query, key, value) if dtype is None else dtype
    query, key, value = (jnp.asarray(x, dtype) for x in (query, key, value))
    if bias is not None:
        bias = jnp.asarray(bias, dtype)
    if mask is not None:
        mask = jnp.asarray(mask).astype(bool)

    seed = None
    if dropout_rate > 0.0 and not deterministic:
        if broadcast_dropout:
            raise ValueError(
                "uniattn's dropout draws an independent mask per batch element and head; "
                "it cannot share one across them: broadcast_dropout must be False when "
                f"dropout is active (got broadcast_dropout=True, dropout_rate={dropout_rate}); "
                "construct the module with broadcast_dropout=False"
            )
        if dropout_rng is None:
            raise ValueError(
                f"dropout_rate={dropout_rate} with deterministic=False needs a dropout_rng"
            )
        seed = jax.random.bits(dropout_rng, (), jnp.uint32)
    else:
        dropout_rate = 0.0

    out = uniattn.attention(
        query,
        key,
        value,
        bias=bias,
        mask=mask,
        causal="top_left" if is_causal else False,
        dropout_rate=dropout_rate,
        dropout_seed=seed,
    )
    if mask is not None:
        out = _mean_where_no_key(out, value, mask, bool(is_causal))
    return out


def _is_default_precision(precision: Any) -> bool:
    if precision is None:
        return True
    if isinstance(precision, (tuple, list)):
        return all(_is_default_precision(p) for p in precision)
    try:
        return jax.lax.Precision(precision) == jax.lax.Precision.DEFAULT
    except (TypeError, ValueError):
        return False


def _mean_where_no_key(out, value, mask, causal: bool):
    """``out`` with each row that attends no key replaced by the mean of the values.

    The rows are found from ``mask`` alone (``[..., q_len | 1, kv_len]``): with a top-left
    causal mask a row ``i`` attends a key iff its first allowed key is at ``j <= i``.
    """
    q_len, heads = out.shape[-3], out.shape[-2]
    attends = jnp.any(mask, axis=-1)
    if causal:
        first = jnp.argmax(mask, axis=-1)
        attends = attends & (first <= jnp.arange(q_len))
    # [..., heads | 1, q_len | 1] -> [*batch, q_len | 1, heads | 1, 1], as out's axes
    batch_rank = out.ndim - 3
    attends = jnp.reshape(attends, (1,) * (batch_rank + 2 - attends.ndim) + attends.shape)
    attends = jnp.swapaxes(attends, -1, -2)[..., None]
    mean = jnp.mean(value, axis=-3, keepdims=True)
    mean = jnp.repeat(mean, heads // value.shape[-2], axis=-2)
    return jnp.where(attends, out, mean.astype(out.dtype))
