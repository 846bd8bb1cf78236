"""The adapter contract (``Backend``): scan, fori_loop, chunks, the block accumulator, cond,
remat, stop_gradient, custom_vjp and the performance hooks behave alike everywhere, eagerly,
staged (``Backend.stage``) and compiled."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from .tolerances import assert_close


def _arange(backend, n, dtype="float64"):
    return backend.asarray(np.arange(n, dtype=np.float64), dtype)


def test_scan_carries_and_stacks(backend):
    xs = _arange(backend, 5)

    def step(carry, i, x):
        (total,) = carry
        (x,) = x
        return (total + x,), (total + x, x * 2 + i)  # i: the step's index

    (total,), (partial, doubled) = backend.adapter.scan(step, (xs[0] * 0,), (xs,), 5)
    assert float(backend.to_numpy(total)) == 10.0
    np.testing.assert_array_equal(backend.to_numpy(partial), [0, 1, 3, 6, 10])
    np.testing.assert_array_equal(backend.to_numpy(doubled), [0, 3, 6, 9, 12])


@pytest.mark.parametrize("length", [1, 3])
def test_scan_without_outputs(backend, length):
    xs = _arange(backend, length)
    (total,), ys = backend.adapter.scan(
        lambda c, _i, x: ((c[0] + x[0],), None), (xs[0] * 0,), (xs,), length
    )
    assert ys is None
    assert float(backend.to_numpy(total)) == sum(range(length))


def _fori_sum(backend, xs, lower, upper, max_trips):
    """sum(xs[lower:upper]) * 2 through ``fori_loop``, with a None leaf in the carry."""

    def body(i, carry):
        total, nothing = carry
        assert nothing is None
        return total + xs[i] * 2, None

    total, _ = backend.adapter.fori_loop(lower, upper, body, (xs[0] * 0, None), max_trips)
    return total


def _run(backend, how, fn):
    """``fn`` as called eagerly, through ``Backend.stage`` (uniattn's own staging) or
    ``Backend.jit`` (a caller's compiler)."""
    wrap = {"eager": lambda f: f, "staged": backend.stage, "compiled": backend.jit}[how]
    return wrap(fn)


@pytest.mark.parametrize("how", ["eager", "staged", "compiled"])
@pytest.mark.parametrize(("lower", "upper"), [(1, 4), (2, 2), (3, 1), (0, 6)])
def test_fori_loop_bounds(backend, how, lower, upper):
    """Static and array bounds, empty and reversed ranges, eagerly, staged and compiled."""
    xs = _arange(backend, 6)
    ints = backend.asarray(np.array([lower, upper], np.int32))
    expected = 2 * sum(range(lower, upper))

    def static(x):
        return _fori_sum(backend, x, lower, upper, max_trips=6)

    def dynamic(x, bounds):
        return _fori_sum(backend, x, bounds[0], bounds[1], max_trips=6)

    assert float(backend.to_numpy(_run(backend, how, static)(xs))) == expected
    assert float(backend.to_numpy(_run(backend, how, dynamic)(xs, ints))) == expected


@pytest.mark.needs_autodiff
@pytest.mark.parametrize("how", ["eager", "staged", "compiled"])
def test_fori_loop_differentiates_with_array_bounds(backend, how):
    xs = _arange(backend, 6) + 1
    bounds = backend.asarray(np.array([1, 4], np.int32))

    def loss(x):
        def body(i, carry):
            return (carry[0] * x[i],)

        return backend.adapter.fori_loop(bounds[0], bounds[1], body, (x[0] * 0 + 1,), 6)[0]

    def grads(x):
        out, vjp_fn = backend.vjp(loss, x)
        return out, vjp_fn(x[0] * 0 + 1)[0]

    out, g = _run(backend, how, grads)(xs)
    assert float(backend.to_numpy(out)) == 2 * 3 * 4
    np.testing.assert_array_equal(backend.to_numpy(g), [0, 12, 8, 6, 0, 0])


@pytest.mark.needs_autodiff
def test_remat_keeps_gradients(backend):
    """Gradients through ``remat(fn)`` equal those through ``fn``, for every argument."""

    def fn(a, b, k):
        return a * b * b + a * k  # k: a plain Python number, passed through

    x, y = _arange(backend, 4), _arange(backend, 4) + 1
    d = _arange(backend, 4) * 0 + 1
    _, plain = backend.vjp(lambda a, b: fn(a, b, 3.0), x, y)
    _, remat = backend.vjp(lambda a, b: backend.adapter.remat(fn)(a, b, 3.0), x, y)
    for g, h in zip(plain(d), remat(d), strict=True):
        np.testing.assert_allclose(backend.to_numpy(h), backend.to_numpy(g))


@pytest.mark.needs_autodiff
def test_stop_gradient(backend):
    x = _arange(backend, 3)
    _, vjp_fn = backend.vjp(lambda a: a * backend.adapter.stop_gradient(a), x)
    (g,) = vjp_fn(_arange(backend, 3) * 0 + 1)
    np.testing.assert_array_equal(backend.to_numpy(g), [0, 1, 2])  # d(a * c)/da = c


@pytest.mark.needs_autodiff
def test_custom_vjp_uses_the_given_backward(backend):
    """``custom_vjp`` computes with ``fwd`` and differentiates with ``bwd`` (not autodiff)."""

    def fwd(a, b):
        return a * b, (a, b)

    def bwd(residuals, g):
        a, _b = residuals
        return g * 10.0, g * a  # deliberately not the true d/da, to prove bwd is used

    f = backend.adapter.custom_vjp(fwd, bwd)
    x, y = _arange(backend, 3), _arange(backend, 3) + 1
    out, vjp_fn = backend.vjp(f, x, y)
    np.testing.assert_array_equal(backend.to_numpy(out), [0, 2, 6])
    dx, dy = vjp_fn(_arange(backend, 3) * 0 + 1)
    np.testing.assert_array_equal(backend.to_numpy(dx), [10, 10, 10])
    np.testing.assert_array_equal(backend.to_numpy(dy), [0, 1, 2])


def test_custom_vjp_forward(backend):
    f = backend.adapter.custom_vjp(lambda a: (a + 1, None), lambda r, g: (g,))
    np.testing.assert_array_equal(backend.to_numpy(f(_arange(backend, 2))), [1, 2])


@pytest.mark.parametrize("how", ["eager", "staged", "compiled"])
def test_block_accumulator_in_nested_loops(backend, how):
    """``blocks``/``add_block``/``stacked`` carried through a scan and, inside it, a
    fori_loop with array bounds: block ``i`` gets ``(j + 1) * (i + 1)`` from every outer
    step ``j``, for the inner indices ``i`` in ``bounds`` only; the rest stay 0."""
    xp = backend.namespace()
    bounds = backend.asarray(np.array([1, 3], np.int32))

    def f(bounds, steps):
        ones = xp.reshape(_arange(backend, 6) * 0 + 1, (2, 3))
        weights = _arange(backend, 4) + 1  # block i's weight, i + 1

        def outer(carry, j, xs):
            (step,) = xs

            def inner(i, carry):
                (acc,) = carry
                return (backend.adapter.add_block(acc, i, ones * step * weights[i]),)

            return backend.adapter.fori_loop(bounds[0], bounds[1], inner, carry, 2), None

        zeros = xp.zeros((4, 2, 3), dtype=ones.dtype, device=backend.device(ones))
        init = (backend.adapter.blocks(zeros),)
        (acc,), _ = backend.adapter.scan(outer, init, (steps,), 3)
        return backend.adapter.stacked(acc)

    out = _run(backend, how, f)(bounds, _arange(backend, 3) + 1)
    expected = np.zeros((4, 2, 3))
    expected[1], expected[2] = 6 * 2, 6 * 3  # (1 + 2 + 3) * (i + 1)
    np.testing.assert_array_equal(backend.to_numpy(out), expected)


@pytest.mark.parametrize("how", ["eager", "staged", "compiled"])
def test_cond_takes_fast_only_when_the_predicate_holds(backend, how):
    """``cond(pred, fast, safe, operands)``: ``safe`` whenever pred is False; where pred
    holds, ``fast`` (torch.compile may take ``safe``, which must then agree); gradients
    flow through the branch taken."""
    xs = _arange(backend, 4)
    xp = backend.namespace()

    def f(x):
        return backend.adapter.cond(
            xp.sum(x) > 100.0, lambda a: (a * 3.0,), lambda a: (a * 3.0 + 0.0,), (x,)
        )

    def g(x):
        return backend.adapter.cond(
            xp.sum(x) > 100.0, lambda a: (a * 0.0,), lambda a: (a * 2.0,), (x,)
        )

    f, g = (_run(backend, how, h) for h in (f, g))
    np.testing.assert_array_equal(backend.to_numpy(g(xs)[0]), [0, 2, 4, 6])  # pred False
    np.testing.assert_array_equal(backend.to_numpy(f(xs * 50.0)[0]), [0, 150, 300, 450])
    if backend.has_autodiff:
        _, vjp_fn = backend.vjp(lambda x: g(x)[0], xs)
        np.testing.assert_array_equal(backend.to_numpy(vjp_fn(xs * 0 + 1.0)[0]), [2, 2, 2, 2])


@pytest.mark.parametrize("how", ["eager", "staged", "compiled"])
def test_cond_call_sanitizes_only_when_the_predicate_fails(backend, how):
    """``cond_call(pred, fn, sanitize, operands, passed)``: ``fn(*operands, *passed)`` where
    pred holds, ``fn(*sanitize(*operands), *passed)`` where it does not (torch.compile may
    always sanitize, which this ``sanitize`` makes harmless where pred holds); ``passed``
    (None among them) reach ``fn`` untouched; gradients flow through either branch; ``fn``
    is told ``finite=True`` only where pred holds."""
    xs = _arange(backend, 4)
    xp = backend.namespace()

    def f(x, fix):
        def fn(a, b, c, nothing, finite=False):
            assert nothing is None
            # Where pred fails (fix 0) only the sanitized branch may run.
            assert not (finite and fix == 0.0), "finite=True on operands that are not"
            return (a * 2.0 + b + c * 10.0,)

        def sanitize(a, b):
            return a * fix, b

        return backend.adapter.cond_call(xp.sum(x) < 100.0, fn, sanitize, (x, x), (x * 0.5, None))

    fixed, harmless = (_run(backend, how, functools.partial(f, fix=fix)) for fix in (0.0, 1.0))
    np.testing.assert_array_equal(backend.to_numpy(harmless(xs)[0]), [0, 8, 16, 24])  # pred holds
    np.testing.assert_array_equal(backend.to_numpy(fixed(xs * 50.0)[0]), [0, 300, 600, 900])
    if backend.has_autodiff:
        _, vjp_fn = backend.vjp(lambda x: fixed(x * 50.0)[0], xs)
        np.testing.assert_array_equal(backend.to_numpy(vjp_fn(xs * 0 + 1.0)[0]), [300] * 4)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_masked(backend, dtype):
    """``masked(s, allowed, nan_free)`` is ``where(allowed, s, -inf)``, with ``allowed``
    broadcast: NaN and inf scores where not allowed become -inf unless ``nan_free`` says
    there are none; with and without autodiff watching ``s``."""
    scores = np.array([[[0.5, -np.inf, np.inf, 2.0], [np.nan, 1.0, -3.0, np.nan]]] * 2)
    allowed = np.array([[True, False, True, False], [False, True, True, False]])
    expected = np.where(allowed, scores, -np.inf)
    mask = backend.asarray(allowed)
    s = backend.asarray(scores, dtype)
    np.testing.assert_array_equal(backend.to_numpy(backend.adapter.masked(s * 1.0, mask)), expected)
    finite = np.where(np.isnan(scores), 7.0, scores)  # nan_free: no NaN, infinities allowed
    out = backend.adapter.masked(backend.asarray(finite, dtype), mask, nan_free=True)
    np.testing.assert_array_equal(backend.to_numpy(out), np.where(allowed, finite, -np.inf))
    if backend.has_autodiff:
        x = backend.asarray(finite, dtype)
        out, vjp_fn = backend.vjp(lambda x: backend.adapter.masked(x * 1.0, mask, True), x)
        np.testing.assert_array_equal(backend.to_numpy(out), np.where(allowed, finite, -np.inf))
        grad = vjp_fn(backend.asarray(np.ones(finite.shape), dtype))[0]
        expected_grad = np.broadcast_to(np.where(allowed, 1.0, 0.0), finite.shape)
        np.testing.assert_array_equal(backend.to_numpy(grad), expected_grad)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_keep_mask_and_dropped(backend, dtype):
    """``dropped(x, keep_mask(hashed, least), scale)`` is ``x * scale`` where ``hashed >=
    least`` and 0 elsewhere, bit for bit, at int32's extremes and the threshold's
    neighbours. Without autodiff a dropped NaN or inf may stay non-finite (an adapter may
    multiply by the mask); under autodiff it is 0, and the gradient is ``scale`` where kept
    and 0 where dropped."""
    least = 123456789
    hashed = np.array(
        [[least, least - 1, 2**31 - 1, -(2**31)], [-(2**31) + 1, 0, least + 1, -least]], np.int32
    )
    values = np.array([[[0.5, np.nan, np.inf, 2.0], [np.nan, 1.0, -3.0, 0.25]]] * 2)
    kept = hashed >= least  # [[T, F, T, F], [F, F, T, F]]
    scale = 1.0 / 0.9
    x = backend.asarray(values, dtype)
    expected = np.where(kept, backend.to_numpy(x * scale), 0.0)

    def dropped(x):
        keep = backend.adapter.keep_mask(backend.asarray(hashed), least)
        return backend.adapter.dropped(x * 1.0, keep, scale)

    out = backend.to_numpy(dropped(x))
    settled = np.isfinite(values) | kept  # all but the dropped non-finite entries
    np.testing.assert_array_equal(out[settled], expected[settled])
    assert np.all((out[~settled] == 0) | ~np.isfinite(out[~settled])), out
    if backend.has_autodiff:
        out, vjp_fn = backend.vjp(dropped, x)
        np.testing.assert_array_equal(backend.to_numpy(out), expected)
        grad = vjp_fn(backend.asarray(np.ones(values.shape), dtype))[0]
        expected_grad = np.broadcast_to(np.where(kept, scale, 0.0), values.shape)
        np.testing.assert_allclose(backend.to_numpy(grad), expected_grad, rtol=1e-6)


def test_concrete_ints(backend):
    """``concrete_ints(x)`` is None or ``x.tolist()``, eagerly (staged or compiled: None or
    the values, never anything else)."""
    x = backend.asarray(np.array([[3, -1], [0, 7]], np.int32))
    values = backend.adapter.concrete_ints(x)
    assert values is None or values == [[3, -1], [0, 7]], values
    zero_d = backend.adapter.concrete_ints(backend.asarray(np.array(5, np.int32)))
    assert zero_d is None or (zero_d == 5 and isinstance(zero_d, int)), zero_d


def test_exp_shifted(backend):
    """``exp_shifted(s, shift) == exp(s - shift)`` to a few ulp (an adapter may take another
    route to exp, such as torch's and NumPy's faster exp2), with exact zeros for -inf scores
    and shifts of +inf, with and without autodiff watching ``s``."""
    s = backend.asarray(np.array([[0.0, -np.inf, 3.0], [1.0, 2.0, -np.inf]]), "float64")
    shift = backend.asarray(np.array([[3.0], [np.inf]]), "float64")
    expected = np.exp(backend.to_numpy(s) - backend.to_numpy(shift))
    rtol = 8 * np.finfo(np.float64).eps  # zeros must be exact: no atol
    out = backend.adapter.exp_shifted(s * 1.0, shift)
    np.testing.assert_allclose(backend.to_numpy(out), expected, rtol=rtol, atol=0)
    if backend.has_autodiff:
        out, vjp_fn = backend.vjp(lambda x: backend.adapter.exp_shifted(x * 1.0, shift), s)
        np.testing.assert_allclose(backend.to_numpy(out), expected, rtol=rtol, atol=0)
        grad = vjp_fn(out * 0 + 1.0)[0]
        np.testing.assert_allclose(backend.to_numpy(grad), expected, rtol=rtol, atol=0)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_row_sums(backend, dtype):
    """``row_sums(p) == sum(p, axis=-1, keepdims=True)`` to a few ulp of the row's sum (an
    adapter may sum by a product, as NumPy does), zero rows exactly 0, a NaN entry making
    its row NaN, and differentiable (each entry's gradient is its row's cotangent)."""
    rng = np.random.default_rng(0)
    p_np = rng.uniform(size=(2, 3, 4, 300))
    p_np[0, 0, 1] = 0.0
    p_np[1, 2, 3, 7] = np.nan
    p = backend.asarray(p_np, dtype)
    want = np.sum(backend.to_numpy(p).astype(np.float64), axis=-1, keepdims=True)
    out = backend.adapter.row_sums(p)
    assert tuple(out.shape) == (2, 3, 4, 1)
    got = backend.to_numpy(out).astype(np.float64)
    assert got[0, 0, 1, 0] == 0.0 and np.isnan(got[1, 2, 3, 0])
    eps = np.finfo(dtype).eps
    np.testing.assert_allclose(got, want, rtol=8 * eps, atol=0)
    if backend.has_autodiff:
        finite = backend.asarray(np.nan_to_num(p_np), dtype)
        cotangent = backend.asarray(rng.standard_normal((2, 3, 4, 1)), dtype)
        grad = backend.vjp(backend.adapter.row_sums, finite)[1](cotangent)[0]
        want_grad = np.broadcast_to(backend.to_numpy(cotangent), p_np.shape)
        np.testing.assert_array_equal(backend.to_numpy(grad), want_grad)


def test_softmax(backend):
    """``softmax`` over the last axis (plain attention's): each row's probabilities, also
    where the row's logits are near 1e4 (it must shift by the row's maximum first) and 0
    exactly for -inf logits."""
    rng = np.random.default_rng(0)
    s_np = rng.standard_normal((2, 3, 5, 40)) * 4
    s_np[0, 1] += 1e4
    s_np[1, 2, :, :7] = -np.inf
    s = backend.asarray(s_np, "float32")
    exact = backend.to_numpy(s).astype(np.float64)  # the float32 logits, exactly
    want = np.exp(exact - exact.max(axis=-1, keepdims=True))
    want /= want.sum(axis=-1, keepdims=True)
    got = backend.to_numpy(backend.softmax(s)).astype(np.float64)
    assert np.all(got[1, 2, :, :7] == 0.0)
    assert_close(got, want, "float32", what="softmax")


def test_plain_attention_is_attention(backend):
    """Plain attention, the benchmarks' baseline, computes attention (the reference's)."""
    from uniattn import reference
    from uniattn._plain import plain_attention

    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((2, 33, 3, 8)).astype(np.float32) for _ in range(3))
    got = plain_attention(backend, *(backend.asarray(x) for x in (q, k, v)))
    want = reference.attention(*(x.astype(np.float64) for x in (q, k, v)))
    assert_close(backend.to_numpy(got), want, "float32", what="plain attention")


@pytest.mark.parametrize("transposed", [False, True], ids=["a@b", "a@bT"])
@pytest.mark.parametrize("how", ["eager", "staged", "compiled"])
def test_matmul(backend, how, transposed):
    """``matmul(a, b) == a @ b`` (``a @ bᵀ`` with ``transposed``) over the last two axes,
    with the batch axes broadcast as the algorithm's are (query heads on a key/value head's
    group axis of 1), and differentiable in both arguments. Each value may differ by a
    sum's rounding: a few ulp of the sum of the magnitudes of its terms."""
    rng = np.random.default_rng(0)
    a_np, b_np = rng.standard_normal((2, 3, 4, 5)), rng.standard_normal((2, 1, 6, 5))
    a, b = backend.asarray(a_np, "float64"), backend.asarray(b_np, "float64")

    def close(got, want, magnitude):
        error = np.abs(backend.to_numpy(got) - want)
        assert np.all(error <= 8 * np.finfo(np.float64).eps * magnitude), error.max()

    def t(x):
        return np.swapaxes(x, -1, -2)

    def product(a, b):
        if not transposed:  # b as [.., 5, 6]
            b = backend.namespace().matrix_transpose(b)
        return backend.adapter.matmul(a, b, transposed=transposed)

    close(_run(backend, how, product)(a, b), a_np @ t(b_np), np.abs(a_np) @ t(np.abs(b_np)))
    if backend.has_autodiff:
        _, vjp_fn = backend.vjp(product, a, b)
        d_a, d_b = vjp_fn(backend.asarray(np.ones((2, 3, 4, 6)), "float64"))
        # With a cotangent of ones: dA sums b over its keys, dB sums a over heads and rows.
        close(d_a, np.broadcast_to(b_np.sum(-2, keepdims=True), a_np.shape), 6 * np.abs(b_np).max())
        close(
            d_b,
            np.broadcast_to(a_np.sum((1, 2), keepdims=True), b_np.shape),
            12 * np.abs(a_np).max(),
        )


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_matmul_of_16bit_operands_is_float32(backend, dtype):
    """16-bit operands give a float32 result, accumulated in float32: the exact products of
    the 16-bit values summed to float32's rounding (a 16-bit sum would be off by ~2^-8 to
    2^-11 of the magnitudes), whether the adapter lifts them or multiplies them as they are
    (``multiplies_16bit``). 512 terms: a 16-bit accumulator's error would show."""
    if dtype not in backend.dtypes:
        pytest.skip(f"{backend.name} has no {dtype}")
    rng = np.random.default_rng(1)
    a = backend.asarray(rng.standard_normal((2, 3, 8, 512)), dtype)
    b = backend.asarray(rng.standard_normal((2, 1, 16, 512)), dtype)
    a_np, b_np = (backend.to_numpy(x).astype(np.float64) for x in (a, b))  # exact values
    got = backend.adapter.matmul(a, b, transposed=True)
    assert backend.dtype_name(got) == "float32"
    want = a_np @ np.swapaxes(b_np, -1, -2)
    magnitude = np.abs(a_np) @ np.swapaxes(np.abs(b_np), -1, -2)
    error = np.abs(backend.to_numpy(got).astype(np.float64) - want)
    assert np.all(error <= 16 * np.finfo(np.float32).eps * magnitude), (error / magnitude).max()


@pytest.mark.parametrize("how", ["eager", "staged", "compiled"])
def test_chunks_indexed_in_a_loop_and_through_remat(backend, how):
    """``chunks(stacked)[i]`` is ``stacked[i]`` at a loop's index, also as an argument of
    a rematerialised function inside a scan (as the forward passes its key chunks), and
    gradients reach ``stacked`` through it."""
    xp = backend.namespace()
    stacked = xp.reshape(_arange(backend, 24), (3, 1, 2, 4))
    scales = _arange(backend, 2) + 1.0  # scan steps: 1, 2

    def f(stacked):
        @backend.adapter.remat
        def block(chunks, scale):
            def body(i, carry):
                return (carry[0] + chunks[i, ...] * scale,)

            return backend.adapter.fori_loop(0, 3, body, (stacked[0, ...] * 0.0,), 3)[0]

        chunks = backend.adapter.chunks(stacked * 1.0)
        return backend.adapter.scan(lambda c, i, x: (c, block(chunks, x[0])), (), (scales,), 2)[1]

    g = _run(backend, how, f)
    total = np.arange(24.0).reshape(3, 1, 2, 4).sum(axis=0)
    np.testing.assert_array_equal(backend.to_numpy(g(stacked)), [total, 2 * total])
    if backend.has_autodiff and how == "eager":  # of f itself; compiled: test_compiled.py
        _, vjp_fn = backend.vjp(f, stacked)
        grad = vjp_fn(backend.asarray(np.ones((2, 1, 2, 4)), "float64"))[0]
        np.testing.assert_array_equal(backend.to_numpy(grad), np.full((3, 1, 2, 4), 3.0))
