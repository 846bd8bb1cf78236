"""Compiled execution (jax.jit, tf.function(jit_compile=True), torch.compile) equals eager."""

from __future__ import annotations

import numpy as np
import pytest

import uniattn
from uniattn import reference

from .cases import CASES, segment_ids
from .harness import prepare
from .tolerances import assert_close, assert_gradients_close

# Every compile is 5-40 s on a CPU (torch.compile's inductor the slowest): three cases
# that between them hold uneven chunks, GQA, arrays and callables, every mask feature.
COMPILED_CASES = ["mask-and-bias-causal", "callables-window-lengths", "everything"]


def _needs_compiler(backend):
    if backend.name == "numpy":
        pytest.skip("NumPy has no compiler")


@pytest.mark.parametrize("name", COMPILED_CASES)
def test_compiled_forward_equals_eager(backend, name):
    _needs_compiler(backend)
    p = prepare(backend, CASES[name], "float32")
    eager = backend.to_numpy(p.call(*p.primals()))
    compiled = backend.to_numpy(backend.jit(p.call)(*p.primals()))
    assert_close(compiled, eager, "float32", what="compiled vs eager output", repro=p.repro)
    assert_close(compiled, p.reference_output(), "float32", what="compiled output", repro=p.repro)


def _check_gradients(p, grads, what):
    expected = p.reference_gradients()
    actual = {n: p.backend.to_numpy(g) for n, g in zip(expected, grads, strict=True)}
    assert_gradients_close(actual, expected, "float32", what=what, repro=p.repro)


@pytest.mark.needs_autodiff
@pytest.mark.parametrize("mode", ["custom", "autodiff"])
@pytest.mark.parametrize("name", ["lengths-causal-gqa"])
def test_compiled_gradient_step(backend, mode, name):
    """A whole gradient step (forward and vjp) compiled at once; lengths are arguments of
    the compiled function, so the loop bounds they set are traced values."""
    p = prepare(backend, CASES[name], "float32")

    def call(q_lengths, k_lengths, *primals):
        return p.call(*primals, backward=mode, query_lengths=q_lengths, key_lengths=k_lengths)

    def step(d_out, q_lengths, k_lengths, *primals):
        return backend.vjp(lambda *a: call(q_lengths, k_lengths, *a), *primals)[1](d_out)

    lengths = (p.arrays["query_lengths"], p.arrays["key_lengths"])
    grads = backend.jit(step)(p.arrays["d_out"], *lengths, *p.primals())
    _check_gradients(p, grads, "gradient of a compiled step")


@pytest.mark.needs_autodiff
@pytest.mark.parametrize("mode", ["custom", "autodiff"])
def test_gradient_through_compiled_function(backend, mode):
    """Eager autodiff through a compiled forward (torch.compile's AOTAutograd, jax.jit)."""
    p = prepare(backend, CASES["mask-and-bias-causal"], "float32")
    _, vjp_fn = backend.vjp(backend.jit(lambda *a: p.call(*a, backward=mode)), *p.primals())
    _check_gradients(p, vjp_fn(p.arrays["d_out"]), "gradient through a compiled forward")


def test_jax_vmap(backend):
    """jax.vmap over a leading axis equals the batched call."""
    if backend.name != "jax":
        pytest.skip("jax.vmap is JAX's")
    import jax

    p = prepare(backend, CASES["mask-and-bias-causal"], "float32")
    q, k, v, bias = p.primals()
    mapped = jax.vmap(
        lambda q, k, v, b, m: uniattn.attention(
            q, k, v, bias=b, mask=m, causal=True, query_chunk_size=16, key_chunk_size=8
        ),
        in_axes=(0, 0, 0, None, 0),  # the bias is [heads, q_len, kv_len]: no batch axis
    )
    out = mapped(q, k, v, bias, p.arrays["mask"])
    np.testing.assert_allclose(np.asarray(out), p.reference_output(), atol=1e-5, rtol=1e-5)


def test_jax_vmap_lengths(backend):
    """jax.vmap over the batch axis, lengths included: loop bounds become batched values."""
    if backend.name != "jax":
        pytest.skip("jax.vmap is JAX's")
    import jax

    p = prepare(backend, CASES["lengths-causal-gqa"], "float32")
    q, k, v, bias = p.primals()

    def one(q, k, v, b, q_len, k_len):
        kwargs = {**p.case.kwargs(), "query_lengths": q_len, "key_lengths": k_len}
        return uniattn.attention(q, k, v, bias=b, **kwargs)

    out = jax.vmap(one)(q, k, v, bias, p.arrays["query_lengths"], p.arrays["key_lengths"])
    np.testing.assert_allclose(np.asarray(out), p.reference_output(), atol=1e-5, rtol=1e-5)


def test_jax_jit_takes_new_seeds_and_packings_without_recompiling(backend):
    """The dropout seed and the segment ids are data: new values reuse the compiled call."""
    if backend.name != "jax":
        pytest.skip("jax.jit's cache is JAX's")
    import jax

    case = CASES["everything"]
    p = prepare(backend, case, "float32")

    @jax.jit
    def call(seed, ids, *primals):
        return p.call(*primals, dropout_seed=seed, segment_ids=ids)

    outs = []
    for seed, documents in [(1, (12, 17, 16)), (2, (12, 17, 16)), (2, (30, 5, 10))]:
        ids = segment_ids(documents, case.q_len, case.batch)
        outs.append(np.asarray(call(jax.numpy.int32(seed), jax.numpy.asarray(ids), *p.primals())))
    assert call._cache_size() == 1
    assert not np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[1], outs[2])


def test_jax_vmap_packed_sinks(backend):
    """jax.vmap over the batch axis with segment ids, sinks and dropout."""
    if backend.name != "jax":
        pytest.skip("jax.vmap is JAX's")
    import jax

    case = CASES["packed-padding-gqa"].with_(sinks=(4,), dropout_rate=0.2, batch=(2,))
    p = prepare(backend, case, "float32")
    q, k, v, sinks = p.primals()

    def one(q, k, v, ids):
        return uniattn.attention(q, k, v, sinks=sinks, segment_ids=ids, **case.kwargs())

    out = jax.vmap(one)(q, k, v, p.arrays["q_segment_ids"])
    # vmap calls each batch element with batch index 0: dropout's batch index is 0 for all
    expected = [
        reference.attention(
            *(p.rounded[n][b] for n in ("query", "key", "value")),
            sinks=p.rounded["sinks"],
            segment_ids=p.rounded["q_segment_ids"][b],
            **case.semantics(),
        )
        for b in range(2)
    ]
    np.testing.assert_allclose(np.asarray(out), np.stack(expected), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_tf_function_with_autograph(backend, jit_compile):
    """A plain ``@tf.function`` (AutoGraph on, as users write it) around uniattn."""
    if backend.name != "tensorflow":
        pytest.skip("tf.function is TensorFlow's")
    import tensorflow as tf

    rng = np.random.default_rng(0)
    q, k, v = (tf.constant(rng.standard_normal((2, 19, 2, 8)), tf.float32) for _ in range(3))
    lengths = tf.constant([19, 11])

    @tf.function(jit_compile=jit_compile)
    def step(q, k, v):
        with tf.GradientTape() as tape:
            tape.watch((q, k, v))
            out = uniattn.attention(q, k, v, causal=True, key_lengths=lengths, key_chunk_size=5)
            loss = tf.reduce_sum(out * out)
        return out, tape.gradient(loss, (q, k, v))

    out, grads = step(q, k, v)
    eager = uniattn.attention(q, k, v, causal=True, key_lengths=lengths, key_chunk_size=5)
    assert_close(out.numpy(), eager.numpy(), "float32", what="tf.function output")
    assert all(np.isfinite(g.numpy()).all() for g in grads)
