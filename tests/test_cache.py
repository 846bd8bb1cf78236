"""uniattn._cache.memoized: computes once per argument tuple, keeps at most maxsize."""

from __future__ import annotations

import pytest

import uniattn
from uniattn._cache import memoized


def test_memoized_computes_once_and_drops_the_oldest():
    calls = []

    @memoized(maxsize=2)
    def square(x):
        calls.append(x)
        return x * x

    assert [square(2), square(2), square(3)] == [4, 4, 9]
    assert calls == [2, 3]
    square(4)  # full: 2, the oldest, goes
    assert list(square.cache) == [(3,), (4,)]
    assert square(2) == 4
    assert calls == [2, 3, 4, 2]


def test_memoized_without_a_bound_keeps_everything():
    square = memoized()(lambda x: x * x)
    for x in range(1000):
        square(x)
    assert len(square.cache) == 1000


def test_staged_programs_are_bounded_where_a_framework_compiles_per_shape():
    """A process calling uniattn with ever new shapes keeps at most STAGED_CACHE_SIZE
    compiled variants per cache, each holding one program (one shape)."""
    jnp = pytest.importorskip("jax.numpy", reason="needs JAX")
    from uniattn import _api

    for cache in (_api._staged_forward.cache, _api._differentiable.cache):
        cache.clear()
    for n in range(1, _api.STAGED_CACHE_SIZE + 9):
        x = jnp.ones((1, n, 1, 4), jnp.float32)
        uniattn.attention(x, x, x)
    staged = _api._staged_forward.cache
    assert len(staged) == _api.STAGED_CACHE_SIZE
    assert all(fn._cache_size() == 1 for fn in staged.values())
