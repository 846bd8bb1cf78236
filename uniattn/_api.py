"""Public entry points: argument checks, layout handling and dispatch to the algorithm."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from . import _chunked
from ._cache import memoized
from ._dispatch import backend_of, type_name
from .backends import FLOAT_DTYPES, Backend

Layout = Literal["BTHD", "BHTD"]
Backward = Literal["custom", "autodiff"]
LAYOUTS = ("BTHD", "BHTD")
BACKWARD_MODES = ("custom", "autodiff")


def attention(
    query: Any,
    key: Any,
    value: Any,
    *,
    bias: Any = None,
    mask: Any = None,
    causal: bool = False,
    window: tuple[int | None, int | None] | None = None,
    query_lengths: Any = None,
    key_lengths: Any = None,
    scale: float | None = None,
    layout: Layout = "BTHD",
    query_chunk_size: int | None = None,
    key_chunk_size: int | None = None,
    backward: Backward = "custom",
    return_lse: bool = False,
) -> Any:
    """Scaled dot-product attention in O(chunk) extra memory, on any framework's arrays.

    Computes ``softmax(scale * query @ key.T + bias, masked) @ value`` chunk by chunk
    (Rabe & Staats 2021): the ``q_len x kv_len`` score matrix never exists, only one
    ``query_chunk_size x key_chunk_size`` block of it per head.

    Parameters
    ----------
    query : array, shape ``[*batch, q_len, heads, d_k]`` (layout "BTHD")
        A NumPy, JAX, PyTorch or TensorFlow array of float16, bfloat16, float32 or
        float64. ``*batch`` is zero or more axes, the same for query, key and value.
    key : array, shape ``[*batch, kv_len, kv_heads, d_k]``
        Same framework and dtype as ``query``; ``heads`` must be a multiple of
        ``kv_heads`` (grouped-query attention; repeated keys are never materialised).
    value : array, shape ``[*batch, kv_len, kv_heads, d_v]``
    bias : array or callable, optional
        Added to the scaled scores; broadcastable to ``[*batch, heads, q_len, kv_len]``.
        A callable ``bias(q_idx, k_idx)`` is called per chunk with the absolute positions
        of its rows and keys, int32 arrays ``[q_chunk, 1]`` and ``[1, k_chunk]`` of the
        inputs' framework, and returns a float array broadcastable to
        ``[*batch, heads, q_chunk, k_chunk]`` (ALiBi, relative positions: never n x n).
    mask : bool array or callable, optional
        True where a query may attend a key; broadcastable like ``bias``, or a callable
        like ``bias``'s returning a bool array.
    causal : bool
        Query ``i`` attends key ``j`` iff ``j <= i + kv_len - q_len`` (aligned to the
        bottom right, as FlashAttention; the usual mask when ``q_len == kv_len``).
        Key chunks above the diagonal are skipped, so it costs about half.
    window : (left, right), optional
        Local attention: with ``i' = i + kv_len - q_len``, key ``j`` is attended iff
        ``i' - left <= j <= i' + right``; None on a side leaves it unbounded. Combines
        with ``causal``. Key chunks outside every row's window are skipped.
    query_lengths, key_lengths : int array ``[*batch]``, optional
        Valid lengths of each batch element (same framework as the inputs): keys at
        index ``>= key_lengths`` are ignored; query rows at index ``>= query_lengths``
        are padding and give 0 (lse ``-inf``, zero gradient). Chunks past the longest
        length are skipped.
    scale : float, optional
        Multiplies the scores; default ``1 / sqrt(d_k)``.
    layout : {"BTHD", "BHTD"}
        "BTHD" is ``[*batch, length, heads, dim]`` (JAX, Keras, the paper); "BHTD" swaps
        the length and head axes (PyTorch's SDPA). The output has the same layout.
    query_chunk_size, key_chunk_size : int, optional
        Rows and columns of the score block computed at once; clipped to the lengths.
        None picks the backend's default for the arrays' device, tuned with
        ``python -m uniattn.bench tune`` (decoding, ``q_len == 1``, has its own key chunk).
    backward : {"custom", "autodiff"}
        How the framework differentiates the call. "custom" (default): the forward saves
        only the output and the per-row logsumexp; the backward recomputes each chunk's
        probabilities from them (FlashAttention-2), registered with the framework's
        custom-gradient hook. First-order reverse mode only. "autodiff": the framework
        differentiates through the chunked loops, rematerialising each chunk (the paper);
        use it for forward-mode (``jax.jvp``) and higher-order derivatives.
    return_lse : bool
        Also return the logsumexp of each row's scores, shaped ``[*batch, heads, q_len]``,
        float32 (float64 for float64 inputs), ``-inf`` for rows that attend no key.
        Gradients flow through it too, so partial attentions can be merged.

    Returns
    -------
    array, shape ``[*batch, q_len, heads, d_v]`` (layout "BTHD"), or ``(out, lse)``
        Same framework, dtype and device as the inputs. Rows that may attend no key are 0.

    Notes
    -----
    A callable ``bias`` gets no gradient of its own; arrays it closes over receive
    gradients with ``backward="autodiff"`` only. Pass the same function object on every
    call: compiled variants are cached per function.

    Raises
    ------
    TypeError
        Arrays of different or unsupported frameworks, non-float or mismatched dtypes, a
        non-bool mask, non-integer lengths, non-bool ``causal`` or ``return_lse``, a
        callable bias or mask returning the wrong type.
    ValueError
        Mismatched shapes, a bad layout or window, non-positive chunk sizes, ``heads``
        not divisible by ``kv_heads``, a bad ``backward``.
    """
    call = _prepare(
        query,
        key,
        value,
        bias=bias,
        mask=mask,
        causal=causal,
        window=window,
        query_lengths=query_lengths,
        key_lengths=key_lengths,
        scale=scale,
        layout=layout,
        query_chunk_size=query_chunk_size,
        key_chunk_size=key_chunk_size,
        backward=backward,
        return_lse=return_lse,
    )
    backend, options, layout = call.backend, call.options, call.layout
    with backend.device_scope(call.arrays[0]):
        if backward == "custom":
            out, lse = _staged_custom(backend, options, layout, call.present)(*call.given)
        else:
            out, lse = _staged_forward(backend, options, layout, True)(*call.arrays)
        return call.result(out, lse)


def vjp(
    query: Any,
    key: Any,
    value: Any,
    *,
    bias: Any = None,
    mask: Any = None,
    causal: bool = False,
    window: tuple[int | None, int | None] | None = None,
    query_lengths: Any = None,
    key_lengths: Any = None,
    scale: float | None = None,
    layout: Layout = "BTHD",
    query_chunk_size: int | None = None,
    key_chunk_size: int | None = None,
    backward: Backward = "custom",
    return_lse: bool = False,
) -> tuple[Any, Callable[[Any], tuple]]:
    """Attention output and a function of the output cotangent returning the gradients.

    Takes the arguments of :func:`attention`. ``vjp_fn(d_out)`` returns ``(dq, dk, dv)``,
    plus ``d_bias`` when ``bias`` is an array (not a callable), each shaped and typed like its
    input. With ``return_lse=True`` the output is ``(out, lse)`` and ``vjp_fn`` takes
    ``(d_out, d_lse)``. With ``backward="custom"`` (default) the gradients come from
    uniattn's own backward on every backend, NumPy included; with "autodiff" from the
    framework's autodiff (not NumPy).

    Examples
    --------
    >>> out, vjp_fn = uniattn.vjp(q, k, v, causal=True)  # doctest: +SKIP
    >>> dq, dk, dv = vjp_fn(np.ones_like(out))  # doctest: +SKIP
    """
    options = dict(
        mask=mask,
        causal=causal,
        window=window,
        query_lengths=query_lengths,
        key_lengths=key_lengths,
        scale=scale,
        layout=layout,
        query_chunk_size=query_chunk_size,
        key_chunk_size=key_chunk_size,
        return_lse=return_lse,
    )
    call = _prepare(query, key, value, bias=bias, backward=backward, **options)
    backend = call.backend
    if backward == "autodiff":
        if not backend.has_autodiff:
            raise ValueError(
                f"backward='autodiff' needs a framework with autodiff; "
                f"{backend.name} has none: use backward='custom'"
            )
        bias_is_array = call.present[0]
        primals = (query, key, value, bias) if bias_is_array else (query, key, value)

        def fn(q, k, v, b=bias):
            return attention(q, k, v, bias=b, backward="autodiff", **options)

        return backend.vjp(fn, *primals)
    with backend.device_scope(call.arrays[0]):
        out, lse = _staged_forward(backend, call.options, call.layout, False)(*call.arrays)
        result = call.result(out, lse)

    def vjp_fn(cotangent):
        d_out, d_lse = cotangent if call.return_lse else (cotangent, None)
        d_out, d_lse = call.checked_cotangents(d_out, d_lse)
        staged = _staged_backward(backend, call.options, call.layout)
        with backend.device_scope(call.arrays[0]):
            grads = staged(*call.arrays, out, lse, d_out, d_lse)
        return tuple(g for g in grads if g is not None)  # d_bias only for an array bias

    return result, vjp_fn


# The staged functions take and return arrays in the user's layout and do the layout
# changes themselves: outside them, in an eager JAX or TensorFlow call, each transpose (and
# in JAX each reshape) would copy its array, which for a decoding step is the whole cache.
@memoized(maxsize=256)
def _staged_forward(backend: Backend, options: _chunked.Options, layout: str, remat: bool):
    """``(q, k, v, bias, mask, q_lengths, k_lengths) -> (out, lse)``: the user's arrays,
    the output in the user's layout (in the accumulation dtype) and its logsumexp."""

    def forward(q, k, v, *others):
        xp = backend.namespace()
        arrays = _canonical_arrays(xp, layout, q, k, v, *others)
        out, lse = _chunked.forward(backend, *arrays, options=options, remat=remat)
        heads = _unpack(q.shape, layout)[1]
        return _from_canonical(xp, layout, out, heads), xp.reshape(lse, _lse_shape(q, layout))

    return backend.stage(forward)


@memoized(maxsize=256)
def _staged_backward(backend: Backend, options: _chunked.Options, layout: str):
    """``(q, k, v, bias, mask, q_lengths, k_lengths, out, lse, d_out, d_lse) -> (dq, dk,
    dv, d_bias)``, all in the user's layout (``d_bias`` None without an array bias)."""

    def backward(q, k, v, bias, mask, q_lengths, k_lengths, out, lse, d_out, d_lse):
        xp = backend.namespace()
        arrays = _canonical_arrays(xp, layout, q, k, v, bias, mask, q_lengths, k_lengths)
        heads, kv_heads = _unpack(q.shape, layout)[1], _unpack(k.shape, layout)[1]
        groups, lse_shape = heads // kv_heads, arrays[0].shape[:-1]
        out, d_out = (_canonical(xp, x, layout, kv_heads, groups) for x in (out, d_out))
        lse, d_lse = (None if x is None else xp.reshape(x, lse_shape) for x in (lse, d_lse))
        dq, dk, dv, d_bias = _chunked.backward(
            backend, *arrays, out, lse, d_out, d_lse, options=options
        )
        return (
            _from_canonical(xp, layout, dq, heads),
            _from_canonical(xp, layout, dk, kv_heads),
            _from_canonical(xp, layout, dv, kv_heads),
            None if d_bias is None else xp.reshape(d_bias, tuple(bias.shape)),
        )

    return backend.stage(backward)


@memoized(maxsize=256)
def _staged_custom(
    backend: Backend, options: _chunked.Options, layout: str, present: tuple[bool, ...]
):
    # Not staged as a whole: the forward and backward it calls are, and are shared with
    # uniattn.vjp (an eager JAX caller compiles each once per shape).
    return _chunked.differentiable(
        backend,
        present,
        _staged_forward(backend, options, layout, False),
        _staged_backward(backend, options, layout),
    )


@dataclass(frozen=True)
class _Call:
    """A validated call: the backend, the user's arrays and the static options."""

    backend: Backend
    # q, k, v, bias, mask, query_lengths, key_lengths as given (bias/mask None if callable)
    arrays: tuple
    options: _chunked.Options
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
        lse_shape = _lse_shape(q, self.layout)
        if backend_of(d_lse=d_lse) is not backend or tuple(d_lse.shape) != lse_shape:
            raise ValueError(
                f"d_lse must be a {backend.name} array shaped like lse {lse_shape}; "
                f"got {type_name(d_lse)} of shape {tuple(d_lse.shape)}"
            )
        return backend.prepare(d_out), backend.prepare(d_lse)


def _prepare(
    query,
    key,
    value,
    *,
    bias,
    mask,
    causal,
    window,
    query_lengths,
    key_lengths,
    scale,
    layout,
    query_chunk_size,
    key_chunk_size,
    backward,
    return_lse,
) -> _Call:
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
    options = _chunked.Options(
        scale=(1.0 / math.sqrt(d_k) if d_k else 1.0) if scale is None else scale,
        query_chunk_size=q_chunk,
        key_chunk_size=k_chunk,
        left=left,
        right=right,
        bias_fn=functions.get("bias"),
        mask_fn=functions.get("mask"),
    )
    return _Call(backend, arrays, options, layout, return_lse)


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


def _canonical_arrays(xp, layout, q, k, v, bias, mask, q_lengths, k_lengths) -> tuple:
    """The checked arrays of a call in :mod:`uniattn._chunked`'s layout."""
    q_len, heads, _ = _unpack(q.shape, layout)
    kv_len, kv_heads, _ = _unpack(k.shape, layout)
    batch, groups = tuple(q.shape[:-3]), heads // kv_heads
    target = (*batch, heads, q_len, kv_len)
    return (
        _canonical(xp, q, layout, kv_heads, groups),
        _canonical(xp, k, layout, kv_heads, 1),
        _canonical(xp, v, layout, kv_heads, 1),
        *(_canonical_score_operand(xp, x, target, kv_heads, groups) for x in (bias, mask)),
        *(_canonical_lengths(xp, x, batch) for x in (q_lengths, k_lengths)),
    )


def _canonical(xp, x, layout, kv_heads, groups):
    """``[*batch, heads, len, dim]`` (or BTHD) -> ``[*batch, kv_heads, groups, len, dim]``."""
    if layout == "BTHD":
        x = _swap_length_and_heads(xp, x)
    return xp.reshape(x, (*x.shape[:-3], kv_heads, groups, *x.shape[-2:]))


def _from_canonical(xp, layout, x, heads):
    """``[*batch, kv_heads, g, len, dim] -> [*batch, heads, len, dim]`` (or BTHD)."""
    x = xp.reshape(x, (*x.shape[:-4], heads, *x.shape[-2:]))
    return _swap_length_and_heads(xp, x) if layout == "BTHD" else x


def _lse_shape(q, layout) -> tuple[int, ...]:
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
