"""The array-API functions uniattn's algorithm calls, on TensorFlow ops.

array-api-compat has no TensorFlow namespace; :class:`Namespace` has the standard's names
and signatures for the subset the algorithm uses (``tests/test_backends.py`` checks that it
covers every ``xp.*`` call in the algorithm).
"""

from __future__ import annotations

import tensorflow as tf


def _like(value, other):
    """``value`` as a tensor of ``other``'s dtype when it is a Python scalar."""
    if not isinstance(value, (int, float)):
        return value
    return tf.constant(value, dtype=getattr(other, "dtype", None))


class Namespace:
    """The subset of the array API standard that uniattn uses, on TensorFlow."""

    bool = tf.bool
    int32, int64 = tf.int32, tf.int64
    float16, bfloat16, float32, float64 = tf.float16, tf.bfloat16, tf.float32, tf.float64

    @staticmethod
    def asarray(obj, /, *, dtype=None, device=None, copy=None):
        x = tf.convert_to_tensor(obj)
        return x if dtype is None else tf.cast(x, dtype)

    @staticmethod
    def astype(x, dtype, /, *, copy=True):
        return tf.cast(x, dtype)

    @staticmethod
    def reshape(x, /, shape, *, copy=None):
        return tf.reshape(x, shape)

    @staticmethod
    def permute_dims(x, /, axes):
        return tf.transpose(x, axes)

    @staticmethod
    def matrix_transpose(x, /):
        return tf.linalg.matrix_transpose(x)

    @staticmethod
    def matmul(x1, x2, /):
        return tf.linalg.matmul(x1, x2)

    @staticmethod
    def concat(arrays, /, *, axis=0):
        return tf.concat(list(arrays), axis)

    @staticmethod
    def stack(arrays, /, *, axis=0):
        return tf.stack(list(arrays), axis)

    @staticmethod
    def arange(start, /, stop=None, step=1, *, dtype=None, device=None):
        if stop is None:
            start, stop = 0, start
        return tf.range(start, stop, step, dtype=dtype or tf.int32)

    @staticmethod
    def zeros(shape, *, dtype=None, device=None):
        return tf.zeros(shape, dtype=dtype or tf.float32)

    @staticmethod
    def full(shape, fill_value, *, dtype=None, device=None):
        return tf.fill(shape, tf.constant(fill_value, dtype=dtype or tf.float32))

    @staticmethod
    def where(condition, x1, x2, /):
        x1, x2 = _like(x1, x2), _like(x2, x1)
        return tf.where(condition, x1, x2)

    @staticmethod
    def logical_and(x1, x2, /):
        return tf.logical_and(x1, x2)

    @staticmethod
    def logical_or(x1, x2, /):
        return tf.logical_or(x1, x2)

    @staticmethod
    def logical_not(x, /):
        return tf.logical_not(x)

    @staticmethod
    def isfinite(x, /):
        return tf.math.is_finite(x)

    @staticmethod
    def all(x, /, *, axis=None, keepdims=False):
        return tf.reduce_all(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def maximum(x1, x2, /):
        return tf.maximum(x1, x2)

    @staticmethod
    def minimum(x1, x2, /):
        return tf.minimum(x1, x2)

    @staticmethod
    def clip(x, /, min=None, max=None):
        x = x if min is None else tf.maximum(x, _like(min, x))
        return x if max is None else tf.minimum(x, _like(max, x))

    @staticmethod
    def zeros_like(x, /, *, dtype=None, device=None):
        return tf.zeros_like(x, dtype=dtype)

    @staticmethod
    def max(x, /, *, axis=None, keepdims=False):
        return tf.reduce_max(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def sum(x, /, *, axis=None, dtype=None, keepdims=False):
        return tf.reduce_sum(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def vecdot(x1, x2, /, *, axis=-1):
        return tf.reduce_sum(x1 * x2, axis=axis)

    @staticmethod
    def abs(x, /):
        return tf.abs(x)

    @staticmethod
    def exp(x, /):
        return tf.exp(x)

    @staticmethod
    def log(x, /):
        return tf.math.log(x)

    @staticmethod
    def tanh(x, /):
        return tf.math.tanh(x)

    @staticmethod
    def logaddexp(x1, x2, /):
        big = tf.maximum(x1, x2)
        safe = tf.where(tf.math.is_inf(big), tf.zeros_like(big), big)
        return safe + tf.math.log(tf.exp(x1 - safe) + tf.exp(x2 - safe))

    @staticmethod
    def min(x, /, *, axis=None, keepdims=False):
        return tf.reduce_min(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def any(x, /, *, axis=None, keepdims=False):
        return tf.reduce_any(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def argmax(x, /, *, axis=None, keepdims=False):
        out = tf.argmax(x, axis=axis)
        return tf.expand_dims(out, axis) if keepdims else out

    @staticmethod
    def flip(x, /, *, axis=None):
        return tf.reverse(x, [axis] if isinstance(axis, int) else list(axis))

    @staticmethod
    def expand_dims(x, /, *, axis=0):
        return tf.expand_dims(x, axis)

    @staticmethod
    def broadcast_to(x, /, shape):
        return tf.broadcast_to(x, shape)

    @staticmethod
    def bitwise_xor(x1, x2, /):
        return tf.bitwise.bitwise_xor(x1, x2)

    @staticmethod
    def bitwise_and(x1, x2, /):
        return tf.bitwise.bitwise_and(x1, x2)

    @staticmethod
    def bitwise_right_shift(x1, x2, /):
        return tf.bitwise.right_shift(x1, x2)
