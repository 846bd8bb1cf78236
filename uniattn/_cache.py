"""A memoising decorator that tracing compilers can follow.

``torch.compile`` does not trace through ``functools.lru_cache``: it warns, ignores the
cache and re-runs the wrapped function on every trace, where uniattn's cached functions
import adapters and build staged callables, which break its graph. A plain dict lookup
it traces like any other, so a warm cache costs a compiled caller nothing.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def memoized(maxsize: int | None = None) -> Callable[[F], F]:
    """Cache a function of hashable positional arguments in a dict.

    Past ``maxsize`` entries the oldest is dropped (first in, first out). Concurrent
    misses may both compute the value; either result is kept, as the functions cached
    here return equivalent values for equal arguments.
    """

    def decorate(fn: F) -> F:
        cache: dict[tuple, Any] = {}

        @functools.wraps(fn)
        def cached(*args: Any) -> Any:
            if args in cache:
                return cache[args]
            value = fn(*args)
            if maxsize is not None and len(cache) >= maxsize:
                # Another thread may evict the same entry first.
                with contextlib.suppress(KeyError, RuntimeError, StopIteration):
                    del cache[next(iter(cache))]
            cache[args] = value
            return value

        cached.cache = cache  # type: ignore[attr-defined]
        return cached  # type: ignore[return-value]

    return decorate
