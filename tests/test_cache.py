"""uniattn._cache.memoized: computes once per argument tuple, keeps at most maxsize."""

from __future__ import annotations

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
