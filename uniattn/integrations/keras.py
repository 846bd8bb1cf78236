"""uniattn in Keras 3: ``keras.ops.dot_product_attention`` and attention layers.

>>> from uniattn.integrations.keras import MultiHeadAttention
>>> layer = MultiHeadAttention(num_heads=8, key_dim=64)  # doctest: +SKIP
>>> y = layer(x, x, use_causal_mask=True)  # doctest: +SKIP

The layers are Keras's own, with the attention computed by :func:`uniattn.attention`:
same constructor, weights and configuration, so a model swaps them in and keeps its
weights. They run on the jax, torch, tensorflow (and numpy, inference only) Keras
backends, whose tensors are the framework's own. Importing this module imports Keras.
"""

from __future__ import annotations

import contextvars
import math
from typing import Any

import keras
from keras import ops

import uniattn

__all__ = ["GroupQueryAttention", "MultiHeadAttention", "dot_product_attention"]


def dot_product_attention(
    query: Any,
    key: Any,
    value: Any,
    bias: Any = None,
    mask: Any = None,
    scale: float | None = None,
    is_causal: bool = False,
    flash_attention: bool | None = None,
    attn_logits_soft_cap: float | None = None,
) -> Any:
    """``keras.ops.dot_product_attention``, computed by :func:`uniattn.attention`.

    Parameters
    ----------
    query : tensor, shape ``(B, T, N, H)``
        Keras tensors (symbolic or the backend's own); any number of leading batch axes.
    key : tensor, shape ``(B, S, K, H)``
        ``N`` a multiple of ``K`` (grouped-query attention; keys are never repeated).
    value : tensor, shape ``(B, S, K, H_v)``
    bias : tensor, optional
        Added to the scaled logits; broadcastable to ``(B, N, T, S)`` by NumPy's rules.
    mask : tensor, optional
        True where a query attends a key (other values are cast to bool); broadcastable
        like ``bias``.
    scale : float, optional
        Default ``1 / sqrt(H)``.
    is_causal : bool
        Query ``i`` attends key ``j`` only if ``j <= i`` (aligned to the top left, as
        Keras's backends do when ``T != S``); combines with ``mask``.
    flash_attention : None or False
        uniattn computes chunked attention itself and calls no fused kernel: True
        raises (use ``keras.ops.dot_product_attention`` for the backend's kernel).
    attn_logits_soft_cap : float, optional
        Soft-caps the scaled logits, ``cap * tanh(logits / cap)``, before the bias; on
        every backend (Keras's own op has it on TPU only).

    Returns
    -------
    tensor, shape ``(B, T, N, H_v)``
        A row whose mask admits no key gives the mean of the values, as Keras's op
        does on every backend (its masked logits are all equally negative), not
        :func:`uniattn.attention`'s zero.
    """
    if flash_attention:
        raise ValueError(
            "uniattn's dot_product_attention computes chunked attention itself and calls no "
            "fused flash-attention kernel: flash_attention must be None or False; got "
            f"{flash_attention!r} (keras.ops.dot_product_attention runs the backend's kernel)"
        )
    operands = (query, key, value, bias, mask)
    if any(x is not None and keras.backend.is_keras_tensor(x) for x in operands):
        op = _DotProductAttention(is_causal=is_causal, attn_logits_soft_cap=attn_logits_soft_cap)
        return op(query, key, value, bias=bias, mask=mask, scale=scale)
    return _attend(
        query,
        key,
        value,
        bias=bias,
        mask=mask,
        scale=scale,
        causal=is_causal,
        softcap=attn_logits_soft_cap,
    )


class _DotProductAttention(keras.Operation):
    """The symbolic form of :func:`dot_product_attention` (functional models)."""

    def __init__(self, is_causal=False, attn_logits_soft_cap=None, *, name=None):
        super().__init__(name=name)
        self.is_causal = is_causal
        self.attn_logits_soft_cap = attn_logits_soft_cap

    def call(self, query, key, value, bias=None, mask=None, scale=None):
        return _attend(
            query,
            key,
            value,
            bias=bias,
            mask=mask,
            scale=scale,
            causal=self.is_causal,
            softcap=self.attn_logits_soft_cap,
        )

    def compute_output_spec(self, query, key, value, bias=None, mask=None, scale=None):
        dtype = keras.backend.result_type(query.dtype, key.dtype, value.dtype)
        return keras.KerasTensor((*query.shape[:-1], value.shape[-1]), dtype=dtype)


def _attend(
    query,
    key,
    value,
    *,
    bias=None,
    mask=None,
    scale=None,
    causal=False,
    softcap=None,
    dropout_rate=0.0,
    dropout_seed=None,
):
    """:func:`uniattn.attention` on the backend's tensors, ``[*batch, T, N, H]``."""
    dtype = keras.backend.result_type(query.dtype, key.dtype, value.dtype)
    query, key, value = (ops.cast(ops.convert_to_tensor(x), dtype) for x in (query, key, value))
    if bias is not None:
        bias = ops.cast(ops.convert_to_tensor(bias), dtype)
    if mask is not None:
        mask = ops.cast(ops.convert_to_tensor(mask), "bool")
    options = {
        "scale": scale,
        "causal": causal,
        "softcap": softcap,
        "dropout_rate": dropout_rate,
        "dropout_seed": dropout_seed,
    }
    if any(s is None for s in query.shape[:-3]):
        return _attend_each_example(query, key, value, bias, mask, options)
    out = uniattn.attention(
        query,
        key,
        value,
        bias=bias,
        mask=mask,
        scale=scale,
        causal="top_left" if causal else False,
        softcap=softcap,
        dropout_rate=dropout_rate,
        dropout_seed=dropout_seed,
    )
    if mask is not None:
        out = _mean_where_no_key(out, value, mask, bool(causal))
    return out


def _attend_each_example(query, key, value, bias, mask, options):
    """:func:`_attend` over the examples of a batch whose size is unknown when traced.

    TensorFlow traces Keras's train and predict functions with the batch size unknown,
    and uniattn needs static shapes: this maps over the examples (flattened batch axes),
    each of static shape. With dropout, example ``b`` is seeded with ``seed ^ b``.
    """
    import tensorflow as tf

    nb = len(query.shape) - 3
    lead = tf.shape(query)[:nb]

    def flat(x, trailing):
        x = tf.reshape(x, tf.concat([[-1], tf.shape(x)[nb:]], 0))
        x.set_shape([None, *trailing])
        return x

    elems = {n: flat(x, x.shape[nb:]) for n, x in (("q", query), ("k", key), ("v", value))}
    fixed = {}
    for name, x in (("bias", bias), ("mask", mask)):
        if x is None:
            continue
        trailing = (*(1,) * (3 - min(len(x.shape), 3)), *x.shape[-3:])
        if len(x.shape) <= 3 or all(s == 1 for s in x.shape[: len(x.shape) - 3]):
            fixed[name] = tf.reshape(x, trailing)  # the same for every example
            continue
        x = tf.reshape(x, tf.concat([tf.ones([nb + 3 - len(x.shape)], tf.int32), tf.shape(x)], 0))
        x = tf.broadcast_to(x, tf.concat([lead, tf.shape(x)[nb:]], 0))
        elems[name] = flat(x, trailing)
    seed = options.pop("dropout_seed")
    if seed is not None:
        count = tf.shape(elems["q"])[0]
        elems["seed"] = tf.bitwise.bitwise_xor(tf.cast(seed, tf.int32), tf.range(count))

    def one(e):
        return _attend(
            e["q"],
            e["k"],
            e["v"],
            bias=e.get("bias", fixed.get("bias")),
            mask=e.get("mask", fixed.get("mask")),
            dropout_seed=e.get("seed"),
            **options,
        )

    q, v = elems["q"], elems["v"]
    spec = tf.TensorSpec((*q.shape[1:-1], v.shape[-1]), q.dtype)
    out = tf.map_fn(one, elems, fn_output_signature=spec)
    out = tf.reshape(out, tf.concat([lead, tf.shape(out)[1:]], 0))
    out.set_shape((*query.shape[:-1], value.shape[-1]))
    return out


def _mean_where_no_key(out, value, mask, causal: bool):
    """``out`` with each row that attends no key replaced by the mean of the values.

    The rows are found from ``mask`` alone (``[..., T | 1, S]``): with a top-left causal
    mask a row ``i`` attends a key iff its first allowed key is at ``j <= i``.
    """
    rank, heads = len(out.shape), out.shape[-2]
    attends = ops.any(mask, axis=-1)
    if causal:
        first = ops.argmax(ops.cast(mask, "int32"), axis=-1)
        rows = ops.arange(ops.shape(out)[-3], dtype="int32")
        attends = ops.logical_and(attends, ops.less_equal(ops.cast(first, "int32"), rows))
    while len(attends.shape) < rank - 1:
        attends = ops.expand_dims(attends, 0)
    # [..., N | 1, T | 1] -> [..., T | 1, N | 1, 1], as out's axes
    attends = ops.expand_dims(ops.swapaxes(attends, -1, -2), -1)
    mean = ops.mean(value, axis=-3, keepdims=True)
    if heads != value.shape[-2]:
        mean = ops.repeat(mean, heads // value.shape[-2], axis=-2)
    return ops.where(attends, out, ops.cast(mean, out.dtype))


# Set by the layers' call for their _compute_attention: causal attention as a flag
# rather than Keras's [T, S] mask, so uniattn skips the key chunks above the diagonal.
_CAUSAL = contextvars.ContextVar("uniattn_keras_causal", default=False)


def _check_flash(flash_attention):
    if flash_attention:
        raise ValueError(
            "uniattn's attention layers compute chunked attention themselves and call no "
            f"fused flash-attention kernel: flash_attention must be None or False; got "
            f"{flash_attention!r}"
        )


def _layer_attention(layer, query, key, value, mask, causal, training, rate, scale, axes):
    """A layer's attention on projected ``query``, ``key``, ``value``, ``mask`` as Keras's
    layers give it (``[B, T, S]`` for one attention axis, expanded before the heads)."""
    rate = rate if training and rate > 0 else 0.0
    seed = None
    if rate:
        # The layer's dropout sublayer holds the seed generator Keras's layer would use.
        seed = keras.random.randint(
            (), 0, 2**31 - 1, dtype="int32", seed=layer._dropout_layer.seed_generator
        )
    rank = len(query.shape)
    axes = tuple(axes) if axes is not None else (rank - 3,)
    n = len(axes)
    if mask is not None:
        mask = ops.cast(mask, "bool")
        while len(mask.shape) < rank - 1 + n:  # as Keras expands it: before the queries
            mask = ops.expand_dims(mask, -2 * n - 1)
    options = {"scale": scale, "causal": causal, "dropout_rate": rate, "dropout_seed": seed}
    if axes == (rank - 3,):
        return _attend(query, key, value, mask=mask, **options)

    # Several attention axes, or one not next to the heads: move the others to the front
    # as batch axes and flatten the attention axes into one length.
    batch = [i for i in range(rank - 2) if i not in axes]
    perm = [*batch, *axes, rank - 2, rank - 1]
    query, key, value = (ops.transpose(x, perm) for x in (query, key, value))
    b = len(batch)
    q_dims, kv_dims = tuple(query.shape[b : b + n]), tuple(key.shape[b : b + n])
    lead = tuple(ops.shape(query)[:b])

    def flat(x):
        return ops.reshape(x, (*lead, -1, *x.shape[-2:]))

    if mask is not None:
        mask_lead = tuple(mask.shape[: -2 * n])
        mask = ops.broadcast_to(mask, (*mask_lead, *q_dims, *kv_dims))
        mask = ops.reshape(mask, (*mask_lead, math.prod(q_dims), math.prod(kv_dims)))
    out = _attend(flat(query), flat(key), flat(value), mask=mask, **options)
    out = ops.reshape(out, (*lead, *q_dims, *out.shape[-2:]))
    return ops.transpose(out, [perm.index(i) for i in range(rank)])


@keras.saving.register_keras_serializable(package="uniattn")
class MultiHeadAttention(keras.layers.MultiHeadAttention):
    """``keras.layers.MultiHeadAttention`` computing its attention with uniattn.

    Takes and gives what Keras's layer does (constructor, call, weights, config).
    ``use_causal_mask=True`` reaches uniattn as causal attention, not as a ``[T, S]``
    mask (for inputs ``[B, T, E]``); ``attention_mask`` and the inputs' Keras masks as
    a mask; ``dropout`` drops attention probabilities while training, with uniattn's
    per-entry dropout seeded from the layer's seed generator (so not Keras's masks).
    ``return_attention_scores=True`` needs the scores uniattn never forms: that call
    computes with Keras's own attention. ``flash_attention=True`` raises; Keras's global
    flash-attention setting does not change how this layer computes.
    """

    def __init__(self, *args, flash_attention=None, **kwargs):
        _check_flash(flash_attention)
        super().__init__(*args, flash_attention=flash_attention, **kwargs)

    def call(
        self,
        query,
        value,
        key=None,
        query_mask=None,
        value_mask=None,
        key_mask=None,
        attention_mask=None,
        return_attention_scores=False,
        training=None,
        use_causal_mask=False,
    ):
        causal = bool(use_causal_mask) and not return_attention_scores and len(query.shape) == 3
        token = _CAUSAL.set(causal)
        try:
            return super().call(
                query,
                value,
                key=key,
                query_mask=query_mask,
                value_mask=value_mask,
                key_mask=key_mask,
                attention_mask=attention_mask,
                return_attention_scores=return_attention_scores,
                training=training,
                use_causal_mask=use_causal_mask and not causal,
            )
        finally:
            _CAUSAL.reset(token)

    def _compute_attention(
        self,
        query,
        key,
        value,
        attention_mask=None,
        training=None,
        return_attention_scores=False,
        use_causal_mask=False,
    ):
        if return_attention_scores:
            return super()._compute_attention(
                query, key, value, attention_mask, training, True, use_causal_mask
            )
        out = _layer_attention(
            self,
            query,
            key,
            value,
            attention_mask,
            causal=use_causal_mask or _CAUSAL.get(),
            training=training,
            rate=self._dropout,
            scale=self._inverse_sqrt_key_dim,
            axes=self._attention_axes,
        )
        return out, None


@keras.saving.register_keras_serializable(package="uniattn")
class GroupQueryAttention(keras.layers.GroupQueryAttention):
    """``keras.layers.GroupQueryAttention`` computing its attention with uniattn,
    without repeating the key and value heads.

    As :class:`MultiHeadAttention`: Keras's constructor, call, weights and config;
    causal attention as a flag, dropout while training from the layer's seed generator;
    ``return_attention_scores=True`` computes that call with Keras's own attention.
    """

    def __init__(self, *args, flash_attention=None, **kwargs):
        _check_flash(flash_attention)
        super().__init__(*args, flash_attention=flash_attention, **kwargs)

    def call(
        self,
        query,
        value,
        key=None,
        query_mask=None,
        value_mask=None,
        key_mask=None,
        attention_mask=None,
        return_attention_scores=False,
        training=None,
        use_causal_mask=False,
    ):
        if return_attention_scores:
            return super().call(
                query,
                value,
                key=key,
                query_mask=query_mask,
                value_mask=value_mask,
                key_mask=key_mask,
                attention_mask=attention_mask,
                return_attention_scores=True,
                training=training,
                use_causal_mask=use_causal_mask,
            )
        self._return_attention_scores = False
        if key is None:
            key = value
        attention_mask = self._compute_attention_mask(
            query,
            value,
            query_mask=query_mask,
            value_mask=value_mask,
            key_mask=key_mask,
            attention_mask=attention_mask,
            use_causal_mask=False,
        )
        gate = self._gate_dense(query) if self.use_gate else None
        out = _layer_attention(
            self,
            self._query_dense(query),
            self._key_dense(key),
            self._value_dense(value),
            attention_mask,
            causal=bool(use_causal_mask),
            training=training,
            rate=self.dropout,
            scale=self._inverse_sqrt_head_dim,
            axes=None,
        )
        if gate is not None:
            out = ops.multiply(out, gate)
        return self._output_dense(out)
