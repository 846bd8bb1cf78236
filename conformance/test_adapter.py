"""The adapter contract: scan, remat, stop_gradient and custom_vjp behave alike everywhere."""

from __future__ import annotations

import numpy as np
import pytest


def _arange(backend, n, dtype="float64"):
    return backend.asarray(np.arange(n, dtype=np.float64), dtype)


def test_scan_carries_and_stacks(backend):
    xs = _arange(backend, 5)

    def step(carry, x):
        (total,) = carry
        (x,) = x
        return (total + x,), (total + x, x * 2)

    (total,), (partial, doubled) = backend.scan(step, (xs[0] * 0,), (xs,), 5)
    assert float(backend.to_numpy(total)) == 10.0
    np.testing.assert_array_equal(backend.to_numpy(partial), [0, 1, 3, 6, 10])
    np.testing.assert_array_equal(backend.to_numpy(doubled), [0, 2, 4, 6, 8])


@pytest.mark.parametrize("length", [1, 3])
def test_scan_without_outputs(backend, length):
    xs = _arange(backend, length)
    (total,), ys = backend.scan(lambda c, x: ((c[0] + x[0],), None), (xs[0] * 0,), (xs,), length)
    assert ys is None
    assert float(backend.to_numpy(total)) == sum(range(length))


@pytest.mark.needs_autodiff
def test_remat_keeps_gradients(backend):
    """Gradients through ``remat(fn)`` equal those through ``fn``, for every argument."""

    def fn(a, b, k):
        return a * b * b + a * k  # k: a plain Python number, passed through

    x, y = _arange(backend, 4), _arange(backend, 4) + 1
    d = _arange(backend, 4) * 0 + 1
    _, plain = backend.vjp(lambda a, b: fn(a, b, 3.0), x, y)
    _, remat = backend.vjp(lambda a, b: backend.remat(fn)(a, b, 3.0), x, y)
    for g, h in zip(plain(d), remat(d), strict=True):
        np.testing.assert_allclose(backend.to_numpy(h), backend.to_numpy(g))


@pytest.mark.needs_autodiff
def test_stop_gradient(backend):
    x = _arange(backend, 3)
    _, vjp_fn = backend.vjp(lambda a: a * backend.stop_gradient(a), x)
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

    f = backend.custom_vjp(fwd, bwd)
    x, y = _arange(backend, 3), _arange(backend, 3) + 1
    out, vjp_fn = backend.vjp(f, x, y)
    np.testing.assert_array_equal(backend.to_numpy(out), [0, 2, 6])
    dx, dy = vjp_fn(_arange(backend, 3) * 0 + 1)
    np.testing.assert_array_equal(backend.to_numpy(dx), [10, 10, 10])
    np.testing.assert_array_equal(backend.to_numpy(dy), [0, 1, 2])


def test_custom_vjp_forward(backend):
    f = backend.custom_vjp(lambda a: (a + 1, None), lambda r, g: (g,))
    np.testing.assert_array_equal(backend.to_numpy(f(_arange(backend, 2))), [1, 2])
