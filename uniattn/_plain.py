"""Plain attention, ``softmax(q kᵀ) v`` with the whole score matrix: the baseline uniattn is
measured against, written once on the array API like the algorithm itself."""

from __future__ import annotations

import functools
import math

from ._cache import memoized


def plain_attention(backend, query, key, value):
    """Plain attention on ``[*batch, length, heads, dim]`` arrays with equal head counts."""
    return _staged(backend)(query, key, value)


@memoized()
def _staged(backend):
    return backend.stage(functools.partial(_plain, backend.namespace()))


def _plain(xp, query, key, value):
    n = query.ndim
    swap = (*range(n - 3), n - 2, n - 3, n - 1)
    q, k, v = (xp.permute_dims(x, swap) for x in (query, key, value))
    s = xp.matmul(q, xp.matrix_transpose(k)) * (1.0 / math.sqrt(q.shape[-1]))
    p = xp.exp(s - xp.max(s, axis=-1, keepdims=True))
    p = p / xp.sum(p, axis=-1, keepdims=True)
    return xp.permute_dims(xp.matmul(p, v), swap)
