"""The arguments of a call: checks, defaults, and the canonical layout of the algorithm.

:func:`parse` turns the user's arguments into a :class:`Call` (or raises a TypeError or
ValueError that names the argument, what was expected and what was given); the layout
functions move arrays between the user's layout and :mod:`uniattn._algorithm`'s.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ._algorithm import Options
from ._dispatch import backend_of, type_name
from .backends import FLOAT_DTYPES, Backend

LAYOUTS = ("BTHD", "BHTD")
BACKWARD_MODES = ("custom", "autodiff")


@dataclass(frozen=True)
class Call:
    """A validated call: the backend, the user's arrays and the static options."""

    backend: Backend
    # q, k, v, bias, mask, query_lengths, key_lengths as given (bias/mask None if callable)
    arrays: tuple
    options: Options
    layout: str
    return_lse: bool

    @property
    def present(self) -> tuple[bool, ...]:
        """Whether each of bias, mask, query_lengths, key_lengths is given as an array."""
        return tuple(x is not None for x in self.arrays[3:])

    @property
    def given(self) -> tuple:
        """q, k, v and the optional arrays that were given."""
        return tuple(x for x in self.arrays if x is not None)

    def result(self, out, lse):
        """What the user gets: ``out`` in the inputs' dtype, and ``lse`` if asked for."""
        out = self.backend.namespace().astype(out, self.arrays[0].dtype, copy=False)
        return (out, lse) if self.return_lse else out

    def checked_cotangents(self, d_out, d_lse):
        """The cotangents, checked against the output's and the lse's shapes."""
        backend = self.backend
        q, _, v = self.arrays[:3]
        expected = (*q.shape[:-1], v.shape[-1])
        if backend_of(d_out=d_out) is not backend or tuple(d_out.shape) != expected:
            raise ValueError(
                f"d_out must be a {backend.name} array shaped like the output "
                f"{expected}; got {type_name(d_out)} of shape {tuple(d_out.shape)}"
            )
        if d_lse is None:
            return backend.prepare(d_out), None
        expected = lse_shape(q, self.layout)
        if backend_of(d_lse=d_lse) is not backend or tuple(d_lse.shape) != expected:
            raise ValueError(
                f"d_lse must be a {backend.name} array shaped like lse {expected}; "
                f"got {type_name(d_lse)} of shape {tuple(d_lse.shape)}"
            )
        return backend.prepare(d_out), backend.prepare(d_lse)


def parse(query, key, value, keywords: Mapping[str, Any]) -> Call:
    """Check a call's arguments (``keywords``: every keyword of ``uniattn.attention``)."""
    bias, mask = keywords["bias"], keywords["mask"]
    causal, window = keywords["causal"], keywords["window"]
    query_lengths, key_lengths = keywords["query_lengths"], keywords["key_lengths"]
    scale, layout = keywords["scale"], keywords["layout"]
    query_chunk_size, key_chunk_size = keywords["query_chunk_size"], keywords["key_chunk_size"]
    backward, return_lse = keywords["backward"], keywords["return_lse"]
    arrays = dict(query=query, key=key, value=value, bias=bias, mask=mask)
    arrays.update(query_lengths=query_lengths, key_lengths=key_lengths)
    backend = backend_of(**{n: x for n, x in arrays.items() if not callable(x)})
    query, key, value = (backend.prepare(x) for x in (query, key, value))
    bias, mask, query_lengths, key_lengths = (
        x if x is None or callable(x) else backend.prepare(x)
        for x in (bias, mask, query_lengths, key_lengths)
    )

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
    if backward not in BACKWARD_MODES:
        raise ValueError(f"backward must be one of {BACKWARD_MODES}; got {backward!r}")
    for name, flag in (("causal", causal), ("return_lse", return_lse)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool; got {type_name(flag)}")
    left, right = _check_window(window)
    if causal:
        right = 0 if right is None else min(right, 0)
    scale = _check_scale(scale)
    q_chunk = _check_chunk("query_chunk_size", query_chunk_size)
    k_chunk = _check_chunk("key_chunk_size", key_chunk_size)

    q_shape, k_shape, v_shape = (
        _static_shape(n, x) for n, x in (("query", query), ("key", key), ("value", value))
    )
    dtype = _check_float("query", backend, query)
    for name, x in (("key", key), ("value", value)):
        if _check_float(name, backend, x) != dtype:
            raise TypeError(
                f"query, key and value must share a dtype; query is {dtype}, "
                f"{name} is {backend.dtype_name(x)}"
            )

    axes = "[*batch, {t}, {h}, {d}]" if layout == "BTHD" else "[*batch, {h}, {t}, {d}]"
    if len(q_shape) < 3:
        raise ValueError(
            f"query must have shape {axes.format(t='q_len', h='heads', d='d_k')} (at least 3 "
            f"axes for layout {layout!r}); got shape {q_shape}"
        )
    for name, shape in (("key", k_shape), ("value", v_shape)):
        if len(shape) != len(q_shape) or shape[:-3] != q_shape[:-3]:
            raise ValueError(
                f"query, key and value must have the same batch axes [*batch] = {q_shape[:-3]} "
                f"followed by 3 axes; query has shape {q_shape}, {name} has shape {shape}"
            )
    batch = q_shape[:-3]
    q_len, heads, d_k = _unpack(q_shape, layout)
    kv_len, kv_heads, d_k_key = _unpack(k_shape, layout)
    v_len, v_heads, _d_v = _unpack(v_shape, layout)
    kv_axes = axes.format(t="kv_len", h="kv_heads", d="d_k")
    if d_k_key != d_k:
        raise ValueError(
            f"key must have shape {kv_axes} with d_k = {d_k} (from query {q_shape}); "
            f"got key shape {k_shape} with d_k = {d_k_key}"
        )
    if (v_len, v_heads) != (kv_len, kv_heads):
        raise ValueError(
            f"value must have shape {axes.format(t='kv_len', h='kv_heads', d='d_v')} with "
            f"kv_len = {kv_len} and kv_heads = {kv_heads} (from key {k_shape}); got value "
            f"shape {v_shape}"
        )
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(
            f"the number of query heads must be a multiple of the number of key/value heads; "
            f"query has {heads} heads (shape {q_shape}), key has {kv_heads} (shape {k_shape})"
        )

    default_q_chunk, default_k_chunk = backend.chunk_sizes(backend.device(query), q_len == 1)
    q_chunk = default_q_chunk if q_chunk is None else q_chunk
    k_chunk = default_k_chunk if k_chunk is None else k_chunk
    target = (*batch, heads, q_len, kv_len)
    functions = {}
    for name, x in (("bias", bias), ("mask", mask)):
        if callable(x):
            functions[name] = _ChunkFunction(name, x, backend, batch, heads, kv_heads)
        elif x is not None:
            _check_score_dtype(name, backend, x)
            _check_broadcastable(name, x, target)
    for name, x in (("query_lengths", query_lengths), ("key_lengths", key_lengths)):
        _check_lengths(name, x, batch, backend)
    arrays = (query, key, value, *(None if callable(x) else x for x in (bias, mask)))
    arrays += (query_lengths, key_lengths)
    options = Options(
        scale=(1.0 / math.sqrt(d_k) if d_k else 1.0) if scale is None else scale,
        query_chunk_size=q_chunk,
        key_chunk_size=k_chunk,
        left=left,
        right=right,
        bias_fn=functions.get("bias"),
        mask_fn=functions.get("mask"),
    )
    return Call(backend, arrays, options, layout, return_lse)


@dataclass(frozen=True)
class _ChunkFunction:
    """A callable bias or mask, its result checked and put in the canonical layout.

    Hashable by the user's function, so compiled variants are cached per function.
    """

    name: str
    fn: Callable
    backend: Backend
    batch: tuple[int, ...]
    heads: int
    kv_heads: int

    def __call__(self, q_idx, k_idx):
        x = self.fn(q_idx, k_idx)
        if not self.backend.is_array_type(type(x)):
            raise TypeError(
                f"{self.name}(q_idx, k_idx) must return a {self.backend.name} array; "
                f"got {type_name(x)}"
            )
        what = f"the result of {self.name}(q_idx, k_idx)"
        _check_score_dtype(self.name, self.backend, x, what)
        target = (*self.batch, self.heads, q_idx.shape[0], k_idx.shape[1])
        _check_broadcastable(what, x, target)
        xp, groups = self.backend.namespace(), self.heads // self.kv_heads
        return _canonical_score_operand(xp, x, target, self.kv_heads, groups)


def canonical_arrays(xp, layout, q, k, v, bias, mask, q_lengths, k_lengths) -> tuple:
    """The checked arrays of a call in :mod:`uniattn._algorithm`'s layout."""
    q_len, heads, _ = _unpack(q.shape, layout)
    kv_len, kv_heads, _ = _unpack(k.shape, layout)
    batch, groups = tuple(q.shape[:-3]), heads // kv_heads
    target = (*batch, heads, q_len, kv_len)
    return (
        canonical(xp, q, layout, kv_heads, groups),
        canonical(xp, k, layout, kv_heads, 1),
        canonical(xp, v, layout, kv_heads, 1),
        *(_canonical_score_operand(xp, x, target, kv_heads, groups) for x in (bias, mask)),
        *(_canonical_lengths(xp, x, batch) for x in (q_lengths, k_lengths)),
    )


def canonical(xp, x, layout, kv_heads, groups):
    """``[*batch, heads, len, dim]`` (or BTHD) -> ``[*batch, kv_heads, groups, len, dim]``."""
    if layout == "BTHD":
        x = _swap_length_and_heads(xp, x)
    return xp.reshape(x, (*x.shape[:-3], kv_heads, groups, *x.shape[-2:]))


def from_canonical(xp, layout, x, heads):
    """``[*batch, kv_heads, g, len, dim] -> [*batch, heads, len, dim]`` (or BTHD)."""
    x = xp.reshape(x, (*x.shape[:-4], heads, *x.shape[-2:]))
    return _swap_length_and_heads(xp, x) if layout == "BTHD" else x


def lse_shape(q, layout) -> tuple[int, ...]:
    """``[*batch, heads, q_len]``, the shape of the logsumexp of a call on ``q``."""
    q_len, heads, _ = _unpack(q.shape, layout)
    return (*q.shape[:-3], heads, q_len)


def _check_lengths(name, x, batch, backend):
    """Check that ``x`` is None or an int array ``[*batch]``."""
    if x is None:
        return
    dtype = backend.dtype_name(x)
    if not dtype.startswith(("int", "uint")):
        raise TypeError(f"{name} must be an integer array [*batch]; got dtype {dtype}")
    shape = _static_shape(name, x)
    if shape != batch:
        raise ValueError(
            f"{name} must have shape [*batch] = {batch} (the batch axes of query); got {shape}"
        )


def _canonical_lengths(xp, x, batch):
    """A checked lengths array as int32 ``[*batch, 1, 1, 1, 1]``."""
    return None if x is None else xp.reshape(xp.astype(x, xp.int32), (*batch, 1, 1, 1, 1))


def _check_score_dtype(name, backend, x, what=None):
    """A mask must be bool, a bias float; ``what`` names the array in messages."""
    dtype = backend.dtype_name(x)
    if name == "mask" and dtype != "bool":
        raise TypeError(f"{what or name} must be a bool array; got dtype {dtype}")
    if name == "bias":
        _check_float(what or name, backend, x)


def _check_window(window):
    """``(left, right)`` of a ``window`` argument (None: unbounded)."""
    if window is None:
        return None, None
    valid = isinstance(window, (tuple, list)) and len(window) == 2
    valid = valid and all(
        w is None or (isinstance(w, numbers.Integral) and not isinstance(w, bool) and w >= 0)
        for w in window
    )
    if not valid:
        raise ValueError(
            f"window must be a pair (left, right) of non-negative ints or None; got {window!r}"
        )
    return tuple(None if w is None else int(w) for w in window)


def _unpack(shape, layout):
    """(length, heads, dim) of a ``[*batch, ...]`` shape in ``layout``."""
    a, b, dim = shape[-3:]
    return (a, b, dim) if layout == "BTHD" else (b, a, dim)


def _swap_length_and_heads(xp, x):
    n = x.ndim
    return xp.permute_dims(x, (*range(n - 3), n - 2, n - 3, n - 1))


def _check_broadcastable(name, x, target):
    """Check that ``x`` broadcasts to ``target``."""
    shape = _static_shape(name, x)
    broadcastable = len(shape) <= len(target) and all(
        s in (1, t) for s, t in zip(reversed(shape), reversed(target), strict=False)
    )
    if not broadcastable:
        raise ValueError(
            f"{name} must be broadcastable to [*batch, heads, q_len, kv_len] = {target}; "
            f"got shape {shape}"
        )


def _canonical_score_operand(xp, x, target, kv_heads, groups):
    """A checked bias or mask at the canonical rank: its heads axis split in two."""
    if x is None:
        return None
    shape = (1,) * (len(target) - x.ndim) + tuple(x.shape)
    heads = (kv_heads, groups) if shape[-3] != 1 else (1, 1)
    return xp.reshape(x, (*shape[:-3], *heads, *shape[-2:]))


def _static_shape(name, x):
    shape = tuple(x.shape)
    if any(not isinstance(s, int) for s in shape):
        raise ValueError(f"{name} must have a static shape; got {shape}")
    return shape


def _check_float(name, backend, x):
    dtype = backend.dtype_name(x)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype {FLOAT_DTYPES}; got {dtype}")
    if dtype not in backend.dtypes:
        raise TypeError(
            f"{name} has dtype {dtype}, which the {backend.name} backend does not support "
            f"(supported: {backend.dtypes})"
        )
    return dtype


def _check_scale(scale):
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None; got {type_name(scale)}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite; got {scale}")
    return float(scale)


def _check_chunk(name, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be a positive integer or None; got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer or None; got {value}")
    return int(value)
