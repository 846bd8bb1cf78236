"""Segment ids from FlashAttention-style cumulative sequence lengths."""

from __future__ import annotations

import numbers
from typing import Any

from ._dispatch import backend_of


def segment_ids_from_cu_seqlens(cu_seqlens: Any, length: int) -> Any:
    """Segment ids ``[length]`` of sequences packed end to end.

    Parameters
    ----------
    cu_seqlens : int array ``[documents + 1]``
        Cumulative lengths ``0, n_0, n_0 + n_1, ...`` (FlashAttention's ``cu_seqlens``),
        non-decreasing, of any framework.
    length : int
        The packed length (static: shapes do not depend on data).

    Returns
    -------
    int32 array ``[length]``, same framework and device
        Position ``t`` holds the index of its sequence; positions at or past
        ``cu_seqlens[-1]`` hold -1 (padding). Reshape to ``[*batch, length]`` for
        ``uniattn.attention(..., segment_ids=...)``.

    Examples
    --------
    >>> ids = uniattn.segment_ids_from_cu_seqlens(np.array([0, 3, 5]), 6)  # doctest: +SKIP
    >>> ids  # doctest: +SKIP
    array([ 0,  0,  0,  1,  1, -1], dtype=int32)
    """
    backend = backend_of(cu_seqlens=cu_seqlens)
    dtype = backend.dtype_name(cu_seqlens)
    if not dtype.startswith(("int", "uint")):
        raise TypeError(f"cu_seqlens must be an integer array; got dtype {dtype}")
    shape = tuple(cu_seqlens.shape)
    if len(shape) != 1 or shape[0] < 1:
        raise ValueError(f"cu_seqlens must have shape [documents + 1]; got shape {shape}")
    if isinstance(length, bool) or not isinstance(length, numbers.Integral) or length < 0:
        raise ValueError(f"length must be a non-negative int; got {length!r}")
    xp = backend.namespace()
    cu = xp.astype(backend.prepare(cu_seqlens), xp.int32)
    positions = xp.arange(int(length), dtype=xp.int32, device=backend.device(cu))
    passed = xp.expand_dims(positions, axis=1) >= xp.expand_dims(cu[1:], axis=0)
    ids = xp.astype(xp.sum(xp.astype(passed, xp.int32), axis=1), xp.int32)
    return xp.where(positions < cu[-1], ids, -1)
