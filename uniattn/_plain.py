"""Plain attention, ``softmax(q kᵀ / √d) v`` with the whole score matrix: the baseline
uniattn is measured against. It is written as a user of each framework would write it: the
queries scaled (not the n x n scores), the framework's own softmax (``Harness.softmax``:
``torch.softmax``, ``tf.nn.softmax``, ``jax.nn.softmax``; NumPy has none), staged where
uniattn stages (``Harness.stage``)."""

from __future__ import annotations

import functools
import math

from ._cache import memoized


def plain_attention(backend, query, key, value):
    """Plain attention on ``[*batch, length, heads, dim]`` arrays with equal head counts.

    Parameters
    ----------
    backend : Harness
        The harness of the arrays' framework (``uniattn.backends.harness``).
    query, key, value : array
        ``[*batch, length, heads, dim]``, the same head count each.

    Returns
    -------
    array
        ``[*batch, q_length, heads, dim]``.
    """
    return _staged(backend)(query, key, value)


@memoized()
def _staged(backend):
    return backend.stage(functools.partial(_plain, backend))


def _plain(backend, query, key, value):
    xp = backend.namespace()
    n = query.ndim
    swap = (*range(n - 3), n - 2, n - 3, n - 1)
    q, k, v = (xp.permute_dims(x, swap) for x in (query, key, value))
    q = q * (1.0 / math.sqrt(q.shape[-1]))
    p = backend.softmax(xp.matmul(q, xp.matrix_transpose(k)))
    return xp.permute_dims(xp.matmul(p, v), swap)
