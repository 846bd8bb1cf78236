"""uniattn.vjp's contract, and the documented limits of backward="custom"."""

from __future__ import annotations

import numpy as np
import pytest

import uniattn
from uniattn import reference


def arrays(dtype=np.float32):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 10, 4, 8)).astype(dtype)
    k = rng.standard_normal((2, 12, 2, 8)).astype(dtype)
    return q, k, rng.standard_normal((2, 12, 2, 8)).astype(dtype)


def test_numpy_vjp_returns_gradients_shaped_and_typed_like_inputs():
    q, k, v = arrays()
    bias = np.ones((4, 1, 12), np.float64)
    out, vjp_fn = uniattn.vjp(q, k, v, bias=bias, causal=True)
    dq, dk, dv, d_bias = vjp_fn(np.ones_like(out))
    for g, x in ((dq, q), (dk, k), (dv, v), (d_bias, bias)):
        assert g.shape == x.shape and g.dtype == x.dtype


def test_vjp_without_bias_returns_three_gradients():
    q, k, v = arrays(np.float64)
    out, vjp_fn = uniattn.vjp(q, k, v, mask=np.ones((10, 12), bool))
    grads = vjp_fn(np.ones_like(out))
    assert len(grads) == 3
    ref = reference.vjp(q, k, v, np.ones_like(out))
    np.testing.assert_allclose(grads[0], ref.dq, atol=1e-12)


def test_vjp_output_equals_attention():
    q, k, v = arrays(np.float64)
    out, _ = uniattn.vjp(q, k, v, causal=True, key_chunk_size=5)
    np.testing.assert_array_equal(out, uniattn.attention(q, k, v, causal=True, key_chunk_size=5))


def test_vjp_rejects_a_badly_shaped_cotangent():
    q, k, v = arrays()
    out, vjp_fn = uniattn.vjp(q, k, v)
    with pytest.raises(ValueError, match=r"d_out .* \(2, 10, 4, 8\).* \(2, 10, 8\)"):
        vjp_fn(np.ones((2, 10, 8), np.float32))
    (out, _lse), vjp_fn = uniattn.vjp(q, k, v, return_lse=True)
    with pytest.raises(ValueError, match=r"d_lse .* \(2, 4, 10\)"):
        vjp_fn((np.ones_like(out), np.ones((2, 10), np.float32)))


def test_numpy_has_no_autodiff_mode():
    with pytest.raises(ValueError, match=r"backward=.autodiff.*numpy.*backward=.custom."):
        uniattn.vjp(*arrays(), backward="autodiff")


def test_jax_forward_mode_needs_autodiff():
    """jax.jvp works with backward="autodiff"; "custom" (a custom_vjp) refuses it."""
    jax = pytest.importorskip("jax", reason="needs JAX")
    q, k, v = (jax.numpy.asarray(x) for x in arrays())

    def f(mode):
        return lambda q: uniattn.attention(q, k, v, backward=mode)

    _, tangent = jax.jvp(f("autodiff"), (q,), (jax.numpy.ones_like(q),))
    assert np.all(np.isfinite(np.asarray(tangent)))
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(f("custom"), (q,), (jax.numpy.ones_like(q),))


def _second_order_torch(mode):
    torch = pytest.importorskip("torch", reason="needs PyTorch")
    q, k, v = (torch.from_numpy(x).requires_grad_() for x in arrays(np.float64))
    out = uniattn.attention(q, k, v, backward=mode, causal=True, key_chunk_size=5)
    (dq,) = torch.autograd.grad((out**2).sum(), q, create_graph=True)
    return [g.numpy() for g in torch.autograd.grad((dq**2).sum(), (q, k, v))]


def _second_order_jax(mode):
    jax = pytest.importorskip("jax", reason="needs JAX")
    with jax.enable_x64(True):
        q, k, v = (jax.numpy.asarray(x) for x in arrays(np.float64))

        def loss(q, k, v):
            out = uniattn.attention(q, k, v, backward=mode, causal=True, key_chunk_size=5)
            return (out**2).sum()

        def grad_norm(q, k, v):
            return (jax.grad(loss)(q, k, v) ** 2).sum()

        return [np.asarray(g) for g in jax.grad(grad_norm, argnums=(0, 1, 2))(q, k, v)]


def _second_order_tensorflow(mode):
    tf = pytest.importorskip("tensorflow", reason="needs TensorFlow")
    q, k, v = (tf.constant(x) for x in arrays(np.float64))
    with tf.GradientTape() as outer:
        outer.watch([q, k, v])
        with tf.GradientTape() as inner:
            inner.watch(q)
            out = uniattn.attention(q, k, v, backward=mode, causal=True, key_chunk_size=5)
            loss = tf.reduce_sum(out**2)
        grad_norm = tf.reduce_sum(inner.gradient(loss, q) ** 2)
    return [g.numpy() for g in outer.gradient(grad_norm, [q, k, v])]


@pytest.mark.parametrize("second_order", [_second_order_torch, _second_order_jax])
def test_second_order_custom_equals_autodiff(second_order):
    """The custom backward is built of differentiable ops: it differentiates again."""
    for custom, autodiff in zip(second_order("custom"), second_order("autodiff"), strict=True):
        np.testing.assert_allclose(custom, autodiff, rtol=1e-10, atol=1e-12)


def test_second_order_tensorflow_custom_raises():
    """TF's custom forward runs off the tape (O(n·d) memory), so its residuals are constants
    to an outer tape: a second derivative would be silently wrong, and raises instead."""
    with pytest.raises(NotImplementedError, match=r"second derivatives .* not supported"):
        _second_order_tensorflow("custom")


def test_second_order_tensorflow_autodiff_is_unsupported():
    """tf.recompute_grad cannot be differentiated twice (a documented limit)."""
    with pytest.raises(NotImplementedError, match="recompute_grad"):
        _second_order_tensorflow("autodiff")


def test_tensorflow_stages_eager_calls_in_a_graph_once_per_shape():
    """Eager TF calls run a traced graph: the algorithm's Python runs once per input shape,
    not per call; a tape watching the inputs gets the op-by-op run it can differentiate."""
    tf = pytest.importorskip("tensorflow", reason="needs TensorFlow")
    from uniattn.backends import tensorflow as adapter

    runs = []

    def fn(x):
        runs.append(tf.executing_eagerly())
        return tf.exp(x)

    staged = adapter.backend.stage(fn)
    x = tf.constant([0.0, 1.0])
    for _ in range(3):
        np.testing.assert_allclose(staged(x).numpy(), np.exp([0.0, 1.0]), rtol=1e-6)
    assert runs == [False]  # one trace
    staged(tf.constant([0.0, 1.0, 2.0]))
    assert runs == [False, False]  # a new shape traces again
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = staged(x)
    assert runs[-1] is True  # op by op
    np.testing.assert_allclose(tape.gradient(y, x).numpy(), np.exp([0.0, 1.0]), rtol=1e-6)


def test_tensorflow_autodiff_with_a_callable_bias_under_a_tape():
    """backward='autodiff' under a tape with a bias function capturing a tensor: the case
    TF's gradient of a traced tf.recompute_grad loop rejects, so it must run op by op."""
    tf = pytest.importorskip("tensorflow", reason="needs TensorFlow")
    q, k, v = arrays(np.float64)
    tq, tk, tv = (tf.constant(x) for x in (q, k, v))
    slope = tf.constant(0.25, tf.float64)

    def bias(q_pos, k_pos):
        return -slope * tf.cast(tf.abs(q_pos - k_pos), tf.float64)

    with tf.GradientTape() as tape:
        tape.watch(tq)
        out = uniattn.attention(tq, tk, tv, bias=bias, backward="autodiff", key_chunk_size=5)
        loss = tf.reduce_sum(out)
    dense = -0.25 * np.abs(np.arange(10)[:, None] - np.arange(12)[None, :])
    ref = reference.vjp(q, k, v, np.ones(out.shape), bias=dense)
    np.testing.assert_allclose(tape.gradient(loss, tq).numpy(), ref.dq, rtol=1e-10, atol=1e-12)
