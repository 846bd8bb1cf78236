"""uniattn.integrations.flax.attention_fn inside Flax's attention modules: equal to their
default attention in values and in gradients (parameters and inputs) under ``jax.jit``."""

from __future__ import annotations

import functools

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("flax")

import jax.numpy as jnp  # noqa: E402
from flax import linen as nn  # noqa: E402
from flax import nnx  # noqa: E402

import uniattn  # noqa: E402
from conformance.tolerances import assert_close, assert_gradients_close  # noqa: E402
from uniattn.integrations.flax import attention_fn  # noqa: E402

F32 = jnp.float32


def _normal(seed, shape, scale=1.0):
    # NumPy's generator: jax.random would compile a program for every shape drawn.
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), F32)


def _params(init, *args):
    """Parameters of the shapes ``init`` makes, drawn with NumPy (see ``_normal``)."""
    shapes = jax.eval_shape(init, jax.random.key(0), *args)
    leaves, tree = jax.tree_util.tree_flatten(shapes)
    return tree.unflatten([_normal(i, x.shape, 0.3) for i, x in enumerate(leaves)])


def _nnx_split(**kwargs):
    """An nnx.MultiHeadAttention's graph and NumPy-drawn parameters (see ``_normal``)."""
    make = lambda: nnx.MultiHeadAttention(  # noqa: E731
        4, 16, num_kv_heads=2, decode=False, rngs=nnx.Rngs(0), **kwargs
    )
    graph, state = nnx.split(nnx.eval_shape(make))
    leaves, tree = jax.tree_util.tree_flatten(state)
    return graph, tree.unflatten([_normal(i, x.shape, 0.3) for i, x in enumerate(leaves)])


def _counted(calls):
    """``attention_fn`` recording the keywords of each call; its signature is the same
    (linen reads it to choose the keywords it passes)."""

    @functools.wraps(attention_fn)
    def fn(*args, **kwargs):
        calls.append(kwargs)
        return attention_fn(*args, **kwargs)

    return fn


def _named(tree) -> dict:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def _assert_same(expected_fn, actual_fn, args, what):
    """Output and gradients w.r.t. every argument of a loss over the output, jitted."""

    def loss(fn):
        def f(*args):
            out = fn(*args)
            weights = jnp.cos(jnp.arange(out.size, dtype=F32)).reshape(out.shape)
            return jnp.sum(out * weights), out

        return jax.jit(jax.value_and_grad(f, argnums=tuple(range(len(args))), has_aux=True))

    (_, want), want_grads = loss(expected_fn)(*args)
    (_, got), got_grads = loss(actual_fn)(*args)
    assert_close(got, want, "float32", what=what)
    assert_gradients_close(_named(got_grads), _named(want_grads), "float32", what=what)


def _padding(lengths, n):
    """Flax's padding mask: padded queries attend no key (the fully masked rows)."""
    valid = np.arange(n)[None, :] < np.asarray(lengths)[:, None]
    return valid[:, None, :, None] & valid[:, None, None, :]  # as nn.make_attention_mask


def test_linen_module_equals_default_attention():
    """Two leading batch axes; Flax's float causal mask and a padding mask, whose padded
    queries attend no key."""
    x = _normal(0, (2, 2, 5, 16))
    padding = _padding([3, 5, 5, 4], 5).reshape(2, 2, 1, 5, 5)
    calls = []
    default = nn.MultiHeadDotProductAttention(num_heads=4)
    ours = nn.MultiHeadDotProductAttention(num_heads=4, attention_fn=_counted(calls))
    params = _params(default.init, x)

    def apply(module):
        def fn(p, x):
            causal = nn.make_causal_mask(x[..., 0])  # float32, as Flax makes it
            return module.apply(p, x, mask=nn.combine_masks(causal, padding))

        return fn

    _assert_same(apply(default), apply(ours), (params, x), "linen")
    assert calls, "uniattn's attention_fn was not called"
    # linen passes only the keywords the function names: these must reach it
    assert {"mask", "dropout_rng", "dropout_rate", "broadcast_dropout", "deterministic"} <= set(
        calls[0]
    )


def test_linen_cross_attention_and_decoding_equal_default():
    """Different query and key lengths with a key padding mask broadcast over heads and
    queries; then decode=True, one query at a time against the module's cache."""
    xq, xkv = _normal(1, (2, 3, 8)), _normal(2, (2, 7, 8))
    mask = (np.arange(7) < np.array([[4], [7]]))[:, None, None, :]
    default = nn.MultiHeadDotProductAttention(num_heads=2)
    ours = nn.MultiHeadDotProductAttention(num_heads=2, attention_fn=attention_fn)
    params = _params(default.init, xq, xkv)
    want, got = (
        jax.jit(lambda p, q, kv, m=m: m.apply(p, q, kv, mask=mask))(params, xq, xkv)
        for m in (default, ours)
    )
    assert_close(got, want, "float32", what="cross")

    outputs = []
    for module in (default, ours):
        module = module.clone(decode=True)
        shapes = jax.eval_shape(module.init, jax.random.key(3), xkv)["cache"]
        cache = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
        step = jax.jit(lambda c, x, m=module: m.apply({**params, "cache": c}, x, mutable=["cache"]))
        steps = []
        for t in range(4):
            out, state = step(cache, xkv[:, t : t + 1])
            cache = state["cache"]
            steps.append(out)
        outputs.append(np.concatenate(steps, axis=1))
    assert_close(outputs[1], outputs[0], "float32", what="linen decode")


def test_nnx_module_with_grouped_kv_heads_equals_default():
    """nnx passes is_causal and module; num_kv_heads=2 for 4 query heads."""
    x = _normal(5, (2, 6, 16))
    mask = _padding([4, 6], 6)
    calls = []
    graph, params = _nnx_split()
    ours, _ = _nnx_split(attention_fn=_counted(calls))

    def apply(graph, **kwargs):
        return lambda p, x: nnx.merge(graph, p)(x, **kwargs)

    _assert_same(
        apply(graph, mask=mask, is_causal=True),
        apply(ours, mask=mask, is_causal=True),
        (params, x),
        "nnx causal",
    )
    assert calls[0]["is_causal"] is True and calls[0]["module"] is None
    # Without a mask nnx's default is jax.nn.dot_product_attention: forward only.
    want = jax.jit(apply(graph))(params, x)
    assert_close(jax.jit(apply(ours))(params, x), want, "float32", what="nnx")


def test_function_with_bias_equals_flax_function():
    """Called as Flax's dot_product_attention, with a bias (and its gradient) and a mask."""
    q, k, v = _normal(6, (2, 5, 2, 8)), _normal(7, (2, 6, 2, 8)), _normal(8, (2, 6, 2, 4))
    bias = _normal(9, (1, 2, 5, 6))
    mask = np.random.default_rng(10).random((2, 1, 5, 6)) > 0.3
    _assert_same(
        lambda q, k, v, b: nn.dot_product_attention(q, k, v, bias=b, mask=mask),
        lambda q, k, v, b: attention_fn(q, k, v, bias=b, mask=mask),
        (q, k, v, bias),
        "bias",
    )


RATE = 0.5


@jax.jit
def _dropout_probe(rng):
    """The dropout mask, read off the output: zero queries give uniform probabilities
    ``1/kv_len``, and one-hot values put key ``j``'s kept probability in column ``j``.
    Batch 2, 3 query heads, 4 queries, 16 keys."""
    q = np.zeros((2, 4, 3, 8), np.float32)
    k = _normal(11, (2, 16, 3, 8))
    v = np.broadcast_to(np.eye(16, dtype=np.float32)[:, None, :], (2, 16, 3, 16))
    kwargs = {"dropout_rate": RATE, "broadcast_dropout": False, "deterministic": False}
    return attention_fn(q, k, v, dropout_rng=rng, **kwargs), (q, k, v)


def _kept(out):
    kept = np.asarray(out) * out.shape[-1] * (1 - RATE)  # [batch, q_len, heads, kv_len]
    assert np.allclose(kept, np.round(kept), atol=1e-5), "not a scaled 0/1 mask"
    return np.round(kept).astype(bool)


def test_dropout_is_per_entry_and_follows_the_rng():
    (out, qkv), (again, _), (other, _) = (_dropout_probe(jax.random.key(s)) for s in (0, 0, 1))
    a, a_again, b = _kept(out), _kept(again), _kept(other)
    np.testing.assert_array_equal(a, a_again)
    assert (a != b).mean() > 0.3  # independent masks differ in about half the entries
    # Each batch element and head has its own mask (Flax's broadcast_dropout shares one).
    assert (a[0] != a[1]).any() and (a[:, :, 0] != a[:, :, 1]).any()
    # The kept fraction is 1 - rate within 5 standard deviations of a binomial.
    assert abs(a.mean() - (1 - RATE)) <= 5 * np.sqrt(RATE * (1 - RATE) / a.size), a.mean()
    # uniattn's dropout, seeded with 32 bits drawn from the key
    seed = jax.random.bits(jax.random.key(0), (), jnp.uint32)
    want = uniattn.attention(*qkv, dropout_rate=RATE, dropout_seed=seed)
    assert_close(out, want, "float32", what="dropout")


def test_linen_module_trains_with_dropout():
    x = _normal(15, (2, 6, 16))
    module = nn.MultiHeadDotProductAttention(
        num_heads=4, dropout_rate=0.5, broadcast_dropout=False, attention_fn=attention_fn
    )
    params = _params(functools.partial(module.init, deterministic=True), x)

    run = jax.jit(lambda key: module.apply(params, x, deterministic=False, rngs={"dropout": key}))
    one, same, other = run(jax.random.key(1)), run(jax.random.key(1)), run(jax.random.key(2))
    np.testing.assert_array_equal(one, same)
    assert not np.allclose(one, other)


def test_compute_dtype_is_the_dtype_argument():
    q = jax.ShapeDtypeStruct((1, 4, 2, 8), F32)
    half = jax.ShapeDtypeStruct((1, 4, 2, 8), jnp.bfloat16)
    assert (
        jax.eval_shape(functools.partial(attention_fn, dtype=jnp.bfloat16), q, q, q).dtype
        == jnp.bfloat16
    )
    assert jax.eval_shape(attention_fn, half, q, q).dtype == F32  # promoted, as Flax does


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dropout_rate": 0.1, "dropout_rng": jax.random.key(0)}, "broadcast_dropout"),
        ({"dropout_rate": 0.1, "broadcast_dropout": False}, "dropout_rng"),
        ({"precision": "highest"}, "precision"),
        ({"precision": jax.lax.Precision.HIGH}, "precision"),
        ({"module": object()}, "sow_weights"),
        ({"qk_attn_weights_einsum": jnp.einsum}, "qk_attn_weights_einsum"),
    ],
)
def test_unsupported_options_raise(kwargs, match):
    q = _normal(17, (1, 4, 2, 8))
    with pytest.raises(ValueError, match=match):
        attention_fn(q, q, q, **kwargs)


def test_inactive_dropout_options_are_accepted():
    """The modules' defaults (broadcast_dropout=True, a precision of None or DEFAULT) pass
    when dropout is off or deterministic."""
    q = _normal(18, (1, 4, 2, 8))
    want = attention_fn(q, q, q)
    for kwargs in (
        {"dropout_rate": 0.1, "deterministic": True},
        {"precision": jax.lax.Precision.DEFAULT},
        {"precision": ("default", "default")},
        {"force_fp32_for_softmax": True},
    ):
        np.testing.assert_array_equal(attention_fn(q, q, q, **kwargs), want)


def test_module_sow_weights_raises():
    x = _normal(19, (1, 4, 8))
    params = _params(nn.MultiHeadDotProductAttention(num_heads=2).init, x)
    module = nn.MultiHeadDotProductAttention(num_heads=2, attention_fn=attention_fn)
    with pytest.raises(ValueError, match="sow_weights"):
        module.apply(params, x, sow_weights=True, mutable=["intermediates"])
