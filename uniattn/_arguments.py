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

from ._algorithm import Operands, Options
from ._dispatch import backend_of, type_name
from ._fused import IMPLEMENTATIONS
from .backends import FLOAT_DTYPES, Backend

LAYOUTS = ("BTHD", "BHTD")
BACKWARD_MODES = ("custom", "autodiff")
CAUSAL = (False, True, "bottom_right", "top_left")
#: The operands that get gradients, besides query, key and value.
DIFFERENTIABLE = ("bias", "sinks")


@dataclass(frozen=True)
class Call:
    """A validated call: the backend, the user's arrays and the static options."""

    backend: Backend
    arrays: Operands  # in the user's layout; None where absent (bias, mask: or callable)
    options: Options
    layout: str
    return_lse: bool
    backward: str = "custom"
    implementation: str | None = None

    @property
    def present(self) -> tuple[bool, ...]:
        """Whether each optional operand (after q, k, v) is given as an array."""
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
    k = keywords
    bias, mask, segment_ids = k["bias"], k["mask"], k["segment_ids"]
    q_ids, kv_ids = _segment_pair(segment_ids)
    named = dict(query=query, key=key, value=value, bias=bias, mask=mask)
    named.update(query_lengths=k["query_lengths"], key_lengths=k["key_lengths"])
    named.update(q_segment_ids=q_ids, kv_segment_ids=kv_ids, sinks=k["sinks"])
    seed = k["dropout_seed"]
    if not isinstance(seed, numbers.Integral):
        named["dropout_seed"] = seed
    backend = backend_of(**{n: x for n, x in named.items() if not callable(x)})
    named = {n: x if x is None or callable(x) else backend.prepare(x) for n, x in named.items()}
    query, key, value = named["query"], named["key"], named["value"]

    layout, backward = k["layout"], k["backward"]
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
    if backward not in BACKWARD_MODES:
        raise ValueError(f"backward must be one of {BACKWARD_MODES}; got {backward!r}")
    implementation = _check_implementation(k["implementation"])
    causal = _check_causal(k["causal"])
    if not isinstance(k["return_lse"], bool):
        raise TypeError(f"return_lse must be a bool; got {type_name(k['return_lse'])}")
    left, right = _check_window(k["window"])
    scale = _check_scale(k["scale"])
    softcap = _check_softcap(k["softcap"])
    dropout_rate = _check_dropout(k["dropout_rate"], seed, backend)
    q_chunk = _check_chunk("query_chunk_size", k["query_chunk_size"])
    k_chunk = _check_chunk("key_chunk_size", k["key_chunk_size"])

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
    q_len, heads, d_k = unpack(q_shape, layout)
    kv_len, kv_heads, d_k_key = unpack(k_shape, layout)
    v_len, v_heads, _d_v = unpack(v_shape, layout)
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
    if causal == "top_left":  # j <= i is j <= i' - (kv_len - q_len)
        shift = q_len - kv_len
        right = shift if right is None else min(right, shift)
    elif causal:
        right = 0 if right is None else min(right, 0)

    default_q_chunk, default_k_chunk = backend.chunk_sizes(backend.device(query), q_len == 1)
    q_chunk = default_q_chunk if q_chunk is None else q_chunk
    k_chunk = default_k_chunk if k_chunk is None else k_chunk
    target = (*batch, heads, q_len, kv_len)
    functions = {}
    for name in ("bias", "mask"):
        x = named[name]
        if callable(x):
            functions[name] = _ChunkFunction(name, x, backend, batch, heads, kv_heads)
            named[name] = None
        elif x is not None:
            _check_score_dtype(name, backend, x)
            _check_broadcastable(name, x, target)
    for name in ("query_lengths", "key_lengths"):
        _check_lengths(name, named[name], batch, backend)
    _check_segment_ids(named, segment_ids, batch, q_len, kv_len, backend)
    _check_sinks(named["sinks"], batch, heads, backend)
    seed = named.get("dropout_seed", seed)
    if dropout_rate:
        seed = _seed_array(backend, seed, query)
    arrays = Operands(
        *(named[n] for n in ("query", "key", "value", "bias", "mask")),
        *(named[n] for n in ("query_lengths", "key_lengths", "q_segment_ids", "kv_segment_ids")),
        named["sinks"],
        seed if dropout_rate else None,
    )
    options = Options(
        scale=(1.0 / math.sqrt(d_k) if d_k else 1.0) if scale is None else scale,
        query_chunk_size=q_chunk,
        key_chunk_size=k_chunk,
        left=left,
        right=right,
        bias_fn=functions.get("bias"),
        mask_fn=functions.get("mask"),
        softcap=softcap,
        dropout_rate=dropout_rate,
    )
    return Call(backend, arrays, options, layout, k["return_lse"], backward, implementation)


def _segment_pair(segment_ids):
    """``(q_ids, kv_ids)`` of a ``segment_ids`` argument (one array: both)."""
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, (tuple, list)):
        if len(segment_ids) != 2 or any(x is None for x in segment_ids):
            raise ValueError(
                "segment_ids must be an int array [*batch, length] or a pair (q_segment_ids, "
                f"kv_segment_ids); got a {type(segment_ids).__name__} of {len(segment_ids)}"
            )
        return tuple(segment_ids)
    return segment_ids, segment_ids


def _check_segment_ids(named, segment_ids, batch, q_len, kv_len, backend):
    """Integer ids ``[*batch, q_len]`` and ``[*batch, kv_len]``."""
    pair = isinstance(segment_ids, (tuple, list))
    for name, length in (("q_segment_ids", q_len), ("kv_segment_ids", kv_len)):
        x = named[name]
        if x is None:
            continue
        what = f"segment_ids[{0 if name.startswith('q') else 1}]" if pair else "segment_ids"
        dtype = backend.dtype_name(x)
        if not dtype.startswith(("int", "uint")):
            raise TypeError(f"{what} must be an integer array; got dtype {dtype}")
        shape = _static_shape(what, x)
        if shape != (*batch, length):
            role = "query" if name.startswith("q") else "key"
            hint = "" if pair else " (one array is for self-attention: q_len == kv_len)"
            raise ValueError(
                f"{what} must have shape [*batch, {role} length] = {(*batch, length)}{hint}; "
                f"got {shape}"
            )


def _check_sinks(x, batch, heads, backend):
    """A float array broadcastable to ``[*batch, heads]``."""
    if x is None:
        return
    _check_float("sinks", backend, x)
    _check_broadcastable("sinks", x, (*batch, heads), "[*batch, heads]")


def _check_implementation(implementation):
    if implementation is None or (
        isinstance(implementation, str) and implementation in IMPLEMENTATIONS
    ):
        return implementation
    if isinstance(implementation, str):
        raise ValueError(
            f"implementation must be None, 'chunked' or 'fused'; got {implementation!r}"
        )
    raise TypeError(
        f"implementation must be None, 'chunked' or 'fused'; got {type_name(implementation)}"
    )


def _check_causal(causal):
    if isinstance(causal, bool) or causal in ("bottom_right", "top_left"):
        return causal
    if isinstance(causal, str):
        raise ValueError(f"causal must be a bool, 'bottom_right' or 'top_left'; got {causal!r}")
    raise TypeError(f"causal must be a bool, 'bottom_right' or 'top_left'; got {type_name(causal)}")


def _check_softcap(softcap):
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a real number > 0 or None; got {type_name(softcap)}")
    if not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be a finite number > 0 or None; got {softcap}")
    return float(softcap)


def _check_dropout(rate, seed, backend) -> float:
    """The dropout rate, in [0, 1), with a seed where it is not 0."""
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real):
        raise TypeError(f"dropout_rate must be a real number in [0, 1); got {type_name(rate)}")
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1); got {rate}")
    if seed is None:
        if rate:
            raise ValueError(
                f"dropout_rate = {rate} needs a dropout_seed (a Python int or a 0-d integer "
                "array); got None"
            )
        return float(rate)
    if isinstance(seed, bool) or not (
        isinstance(seed, numbers.Integral) or backend.is_array_type(type(seed))
    ):
        raise TypeError(
            f"dropout_seed must be a Python int or a 0-d integer array; got {type_name(seed)}"
        )
    if not isinstance(seed, numbers.Integral):
        dtype = backend.dtype_name(seed)
        if not dtype.startswith(("int", "uint")) or tuple(seed.shape) != ():
            raise TypeError(
                "dropout_seed must be a Python int or a 0-d integer array; got an array of "
                f"dtype {dtype} and shape {tuple(seed.shape)}"
            )
    return float(rate)


def _seed_array(backend, seed, like):
    """The seed's low 32 bits as a 0-d int32 array (two's complement) on ``like``'s device."""
    xp = backend.namespace()
    if isinstance(seed, numbers.Integral):
        low = int(seed) % 2**32
        return xp.asarray(
            low - 2**32 if low >= 2**31 else low, dtype=xp.int32, device=backend.device(like)
        )
    return xp.astype(seed, xp.int32)


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


def canonical_arrays(xp, layout, arrays: Operands) -> Operands:
    """The checked arrays of a call in :mod:`uniattn._algorithm`'s layout."""
    q, k = arrays.q, arrays.k
    q_len, heads, _ = unpack(q.shape, layout)
    kv_len, kv_heads, _ = unpack(k.shape, layout)
    batch, groups = tuple(q.shape[:-3]), heads // kv_heads
    target = (*batch, heads, q_len, kv_len)

    def ids(x, axis):
        if x is None:
            return None
        return xp.reshape(xp.astype(x, xp.int32), (*batch, 1, 1, *((-1, 1) if axis else (1, -1))))

    sinks = arrays.sinks
    if sinks is not None:
        sinks = xp.reshape(sinks, (1,) * (len(batch) + 1 - sinks.ndim) + tuple(sinks.shape))
        sinks = _canonical_score_operand(xp, sinks[..., None, None], target, kv_heads, groups)
    return Operands(
        canonical(xp, q, layout, kv_heads, groups),
        canonical(xp, k, layout, kv_heads, 1),
        canonical(xp, arrays.v, layout, kv_heads, 1),
        *(_canonical_score_operand(xp, x, target, kv_heads, groups) for x in arrays[3:5]),
        *(_canonical_lengths(xp, x, batch) for x in arrays[5:7]),
        ids(arrays.q_ids, True),
        ids(arrays.kv_ids, False),
        sinks,
        arrays.seed,
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
    q_len, heads, _ = unpack(q.shape, layout)
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


def unpack(shape, layout):
    """(length, heads, dim) of a ``[*batch, ...]`` shape in ``layout``."""
    a, b, dim = shape[-3:]
    return (a, b, dim) if layout == "BTHD" else (b, a, dim)


def _swap_length_and_heads(xp, x):
    n = x.ndim
    return xp.permute_dims(x, (*range(n - 3), n - 2, n - 3, n - 1))


def _check_broadcastable(name, x, target, axes="[*batch, heads, q_len, kv_len]"):
    """Check that ``x`` broadcasts to ``target`` (whose axes ``axes`` names)."""
    shape = _static_shape(name, x)
    broadcastable = len(shape) <= len(target) and all(
        s in (1, t) for s, t in zip(reversed(shape), reversed(target), strict=False)
    )
    if not broadcastable:
        raise ValueError(f"{name} must be broadcastable to {axes} = {target}; got shape {shape}")


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
