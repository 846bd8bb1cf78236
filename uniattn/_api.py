"""Public entry points: :func:`attention` and :func:`vjp`.

A call flows one way: its arguments are checked (:mod:`uniattn._arguments`), a staged
function of its static options moves the arrays into the algorithm's layout and runs the
algorithm (:mod:`uniattn._algorithm`), which calls only the framework's adapter.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Literal

from . import _algorithm, _fused
from ._arguments import (
    DIFFERENTIABLE,
    canonical,
    canonical_arrays,
    from_canonical,
    lse_shape,
    parse,
    unpack,
)
from ._cache import memoized
from .backends import Backend

Layout = Literal["BTHD", "BHTD"]
Backward = Literal["custom", "autodiff"]
Causal = Literal[False, True, "bottom_right", "top_left"]
Implementation = Literal[None, "chunked", "fused"]


def attention(
    query: Any,
    key: Any,
    value: Any,
    *,
    bias: Any = None,
    mask: Any = None,
    causal: Causal = False,
    window: tuple[int | None, int | None] | None = None,
    query_lengths: Any = None,
    key_lengths: Any = None,
    segment_ids: Any = None,
    sinks: Any = None,
    softcap: float | None = None,
    dropout_rate: float = 0.0,
    dropout_seed: Any = None,
    scale: float | None = None,
    layout: Layout = "BTHD",
    query_chunk_size: int | None = None,
    key_chunk_size: int | None = None,
    backward: Backward = "custom",
    return_lse: bool = False,
    implementation: Implementation = None,
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
    causal : bool or {"bottom_right", "top_left"}
        True or "bottom_right": query ``i`` attends key ``j`` iff ``j <= i + kv_len -
        q_len`` (aligned to the bottom right, as FlashAttention and KV-cache decoding
        need). "top_left": iff ``j <= i`` (torch's ``is_causal``). The two agree when
        ``q_len == kv_len``. Key chunks above the diagonal are skipped: about half the cost.
    window : (left, right), optional
        Local attention: with ``i' = i + kv_len - q_len``, key ``j`` is attended iff
        ``i' - left <= j <= i' + right``; None on a side leaves it unbounded. Combines
        with ``causal``. Key chunks outside every row's window are skipped.
    query_lengths, key_lengths : int array ``[*batch]``, optional
        Valid lengths of each batch element (same framework as the inputs): keys at
        index ``>= key_lengths`` are ignored; query rows at index ``>= query_lengths``
        are padding and give 0 (lse ``-inf``, zero gradient). Chunks past the longest
        length are skipped.
    segment_ids : int array ``[*batch, length]`` or a pair of them, optional
        Packed sequences: query ``i`` attends key ``j`` only if their ids are equal and
        not negative (negative: padding). One array serves queries and keys alike
        (self-attention, ``q_len == kv_len``); a pair ``(q_ids [*batch, q_len], kv_ids
        [*batch, kv_len])`` serves cross-attention. Chunk pairs whose ids cannot match
        are skipped. With ``causal=True`` it is causal attention within each document.
        ``uniattn.segment_ids_from_cu_seqlens`` converts cumulative lengths.
    sinks : float array broadcastable to ``[*batch, heads]``, optional
        One extra logit per head in each row's softmax, with a zero value (attention
        sinks, as gpt-oss): ``out_i = Σ_j exp(z_ij - L_i) v_j`` with ``L_i =
        logaddexp(logsumexp_j z_ij, sink)``. Gets a gradient (``uniattn.vjp``: last).
    softcap : float, optional
        Soft-caps the scaled scores before the bias: ``softcap * tanh(z / softcap)``
        (Gemma 2).
    dropout_rate : float in [0, 1)
        Drops each probability with this rate and scales the kept ones by ``1 / (1 -
        rate)``; the logsumexp is unchanged. The mask is a hash of ``(dropout_seed,
        batch index, head, i, j)`` (``uniattn.reference.dropout_keep``): the same on every
        backend, for any chunk sizes and either layout.
    dropout_seed : int or 0-d integer array
        Required with ``dropout_rate > 0``; its low 32 bits are used. An array seed is
        data: under ``jax.jit`` a new seed does not recompile.
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
        float32 (float64 for float64 inputs), ``-inf`` for rows that attend no key (the
        sink's logit with sinks). Gradients flow through it too, so partial attentions
        can be merged.
    implementation : {None, "chunked", "fused"}
        "chunked": uniattn's algorithm. "fused": the framework's own fused attention
        kernel (torch's ``scaled_dot_product_attention`` restricted to its flash,
        memory-efficient and cuDNN kernels, never its math path; JAX's cuDNN attention on
        NVIDIA GPUs), used only where it computes exactly this call's result and
        gradients; a ValueError names the first reason where it does not (see the
        README's table). Inputs with a non-finite entry take the chunked algorithm,
        whose rules for them the fused kernels do not follow. None (default): "fused"
        where it applies, else "chunked".

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
        not divisible by ``kv_heads``, a bad ``backward`` or ``implementation``, and
        ``implementation="fused"`` for a call no fused kernel computes exactly.
    """
    keywords = {name: value for name, value in locals().items() if name not in _ARRAYS}
    call = parse(query, key, value, keywords)
    backend, options, layout = call.backend, call.options, call.layout
    shapes = _signature(backend, call.arrays)
    kernel = _fused_kernel(call, vjp=False)
    with backend.device_scope(call.arrays[0]):
        if kernel is not None:
            return _staged_fused(backend, kernel, options, layout, call.present, shapes)(
                *call.given
            )
        if backward == "custom":
            staged = _differentiable(backend, options, layout, call.present, shapes)
            out, lse = staged(*call.given)
        else:
            out, lse = _staged_forward(backend, options, layout, True, shapes)(*call.arrays)
        return call.result(out, lse)


_ARRAYS = ("query", "key", "value")
#: Every keyword of :func:`attention` and its default.
_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(attention).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
}


def vjp(query: Any, key: Any, value: Any, **keywords: Any) -> tuple[Any, Callable[[Any], tuple]]:
    """Attention output and a function of the output cotangent returning the gradients.

    Takes the arguments of :func:`attention`. ``vjp_fn(d_out)`` returns ``(dq, dk, dv)``,
    then ``d_bias`` when ``bias`` is an array (not a callable), then ``d_sinks`` when
    ``sinks`` are given, each shaped and typed like its input. With ``return_lse=True`` the output is ``(out, lse)`` and ``vjp_fn`` takes
    ``(d_out, d_lse)``. With ``backward="custom"`` (default) the gradients come from
    uniattn's own backward on every backend, NumPy included; with "autodiff" from the
    framework's autodiff (not NumPy). Where the call runs the framework's fused kernel
    (``implementation``), they come from the framework's autodiff of that kernel, which
    must then compute every gradient returned (torch's CPU kernel has none for a bias).

    Examples
    --------
    >>> out, vjp_fn = uniattn.vjp(q, k, v, causal=True)  # doctest: +SKIP
    >>> dq, dk, dv = vjp_fn(np.ones_like(out))  # doctest: +SKIP
    """
    unknown = sorted(set(keywords) - set(_DEFAULTS))
    if unknown:
        raise TypeError(f"vjp() got unexpected keyword arguments {unknown}")
    keywords = {**_DEFAULTS, **keywords}
    call = parse(query, key, value, keywords)
    backend = call.backend
    if keywords["backward"] == "autodiff":
        if not backend.has_autodiff:
            raise ValueError(
                f"backward='autodiff' needs a framework with autodiff; "
                f"{backend.name} has none: use backward='custom'"
            )
        # The differentiable operands given as arrays are primals, after q, k and v.
        names = [n for n in DIFFERENTIABLE if getattr(call.arrays, n) is not None]
        others = {n: v for n, v in keywords.items() if n not in names}

        def fn(q, k, v, *extra):
            return attention(q, k, v, **dict(zip(names, extra, strict=True)), **others)

        return backend.vjp(fn, query, key, value, *(keywords[n] for n in names))
    shapes = _signature(backend, call.arrays)
    kernel = _fused_kernel(call, vjp=True)
    if kernel is not None:
        return _fused_vjp(call, kernel, shapes)
    with backend.device_scope(call.arrays[0]):
        staged = _staged_forward(backend, call.options, call.layout, False, shapes)
        out, lse = staged(*call.arrays)
        result = call.result(out, lse)

    def vjp_fn(cotangent):
        d_out, d_lse = cotangent if call.return_lse else (cotangent, None)
        d_out, d_lse = call.checked_cotangents(d_out, d_lse)
        staged = _staged_backward(backend, call.options, call.layout, shapes)
        with backend.device_scope(call.arrays[0]):
            grads = staged(*call.arrays, out, lse, d_out, d_lse)
        return tuple(g for g in grads if g is not None)  # d_bias, d_sinks where given

    return result, vjp_fn


vjp.__signature__ = inspect.signature(attention).replace(  # type: ignore[attr-defined]
    return_annotation="tuple[Any, Callable[[Any], tuple]]"
)


#: Variants each staged cache keeps (first in, first out). A variant is one set of static
#: options and, where the framework compiles per shape, one set of input shapes and dtypes:
#: each then holds one compiled program (on XLA:CPU 5-10 MB and about 100 memory mappings).
STAGED_CACHE_SIZE = 32


def _signature(backend: Backend, arrays) -> tuple | None:
    """The shapes and dtypes of a call's arrays where the backend compiles per shape (so a
    cache entry holds one program), else None."""
    if not backend.compiles_per_shape:
        return None
    return tuple(None if x is None else (tuple(x.shape), backend.dtype_name(x)) for x in arrays)


def _fused_kernel(call, vjp: bool) -> Callable | None:
    """The framework's fused kernel for ``call`` where its ``implementation`` allows it and
    the kernel computes it exactly (``Backend.fused``); None: the chunked algorithm.
    Decided once per call, here at the entry."""
    if call.implementation == "chunked":
        return None
    found = call.backend.fused(_fused.describe(call, vjp), call.arrays)
    if isinstance(found, str) or (vjp and not call.backend.has_autodiff):
        if call.implementation == "fused":
            why = found if isinstance(found, str) else f"{call.backend.name} has no autodiff"
            raise ValueError(f"implementation='fused': {why}")
        return None
    return found


def _fused_vjp(call, kernel, shapes):
    """:func:`vjp` through the fused kernel: the framework's autodiff of it gives dq, dk
    and dv (a bias gradient, sinks and the logsumexp make a call ineligible)."""
    backend, given = call.backend, call.given
    staged = _staged_fused(backend, kernel, call.options, call.layout, call.present, shapes)
    with backend.device_scope(given[0]):
        out, grads = backend.vjp(lambda q, k, v: staged(q, k, v, *given[3:]), *given[:3])

    def vjp_fn(cotangent):
        d_out, _ = call.checked_cotangents(cotangent, None)
        with backend.device_scope(given[0]):
            return tuple(grads(d_out))

    return out, vjp_fn


# The staged functions take and return arrays in the user's layout and change layouts
# themselves: outside a staged function, each transpose of an eager call may copy its
# array, which for a decoding step is the whole cache. ``shapes`` (:func:`_signature`) only
# keys the caches.
@memoized(maxsize=STAGED_CACHE_SIZE)
def _staged_forward(
    backend: Backend, options: _algorithm.Options, layout: str, remat: bool, shapes: tuple | None
):
    """``(*operands) -> (out, lse)``: the user's arrays (:class:`~uniattn._algorithm.Operands`
    order), the output in the user's layout (in the accumulation dtype) and its logsumexp."""

    def forward(*arrays):
        xp = backend.namespace()
        ops = canonical_arrays(xp, layout, _algorithm.Operands(*arrays))
        out, lse = _algorithm.forward(backend, ops, options=options, remat=remat)
        q = arrays[0]
        heads = unpack(q.shape, layout)[1]
        return from_canonical(xp, layout, out, heads), xp.reshape(lse, lse_shape(q, layout))

    return backend.stage(forward)


@memoized(maxsize=STAGED_CACHE_SIZE)
def _staged_backward(
    backend: Backend, options: _algorithm.Options, layout: str, shapes: tuple | None
):
    """``(*operands, out, lse, d_out, d_lse) -> (dq, dk, dv, d_bias, d_sinks)``, all in the
    user's layout (``d_bias``, ``d_sinks`` None without a bias array or sinks)."""

    def backward(*args):
        *arrays, out, lse, d_out, d_lse = args
        xp = backend.namespace()
        user = _algorithm.Operands(*arrays)
        ops = canonical_arrays(xp, layout, user)
        heads, kv_heads = unpack(user.q.shape, layout)[1], unpack(user.k.shape, layout)[1]
        groups, lse_rows = heads // kv_heads, ops.q.shape[:-1]
        out, d_out = (canonical(xp, x, layout, kv_heads, groups) for x in (out, d_out))
        lse, d_lse = (None if x is None else xp.reshape(x, lse_rows) for x in (lse, d_lse))
        dq, dk, dv, d_bias, d_sinks = _algorithm.backward(
            backend, ops, out, lse, d_out, d_lse, options=options
        )
        return (
            from_canonical(xp, layout, dq, heads),
            from_canonical(xp, layout, dk, kv_heads),
            from_canonical(xp, layout, dv, kv_heads),
            None if d_bias is None else xp.reshape(d_bias, tuple(user.bias.shape)),
            None if d_sinks is None else xp.reshape(d_sinks, tuple(user.sinks.shape)),
        )

    return backend.stage(backward)


@memoized(maxsize=STAGED_CACHE_SIZE)
def _differentiable(
    backend: Backend,
    options: _algorithm.Options,
    layout: str,
    present: tuple[bool, ...],
    shapes: tuple | None,
):
    """``f(q, k, v, *given) -> (out, lse)`` whose gradient is uniattn's backward,
    registered with the framework's custom-gradient hook (``Backend.custom_vjp``).

    ``present`` says which optional operands (:class:`~uniattn._algorithm.Operands` after
    q, k, v) are among ``given``. The forward and backward it calls are staged each on its
    own, and shared with :func:`vjp`.
    """
    forward = _staged_forward(backend, options, layout, False, shapes)
    backward = _staged_backward(backend, options, layout, shapes)
    optional = _algorithm.Operands._fields[3:]

    def all_arrays(args):
        q, k, v, *given = args
        given = iter(given)  # not list.pop: a tracer may take a starred target for a tuple
        return q, k, v, *(next(given) if p else None for p in present)

    def fwd(*args):
        out, lse = forward(*all_arrays(args))
        return (out, lse), (args, out, lse)

    def bwd(residuals, cotangents):
        args, out, lse = residuals
        dq, dk, dv, d_bias, d_sinks = backward(*all_arrays(args), out, lse, *cotangents)
        grads = {"bias": d_bias, "sinks": d_sinks}  # no gradient: masks, lengths, ids, seed
        others = (grads.get(n) for n, p in zip(optional, present, strict=True) if p)
        return (dq, dk, dv, *others)

    return backend.custom_vjp(fwd, bwd)


@memoized(maxsize=STAGED_CACHE_SIZE)
def _staged_fused(
    backend: Backend,
    kernel: Callable,
    options: _algorithm.Options,
    layout: str,
    present: tuple[bool, ...],
    shapes: tuple | None,
):
    """``f(q, k, v, *given) -> out`` (in the inputs' dtype): the fused ``kernel`` where every
    entry of q, k, v and the bias is finite, else the chunked algorithm, whose gradient is
    uniattn's backward (:func:`_differentiable`). A framework that cannot branch on a value
    while it traces takes the chunked algorithm (``Backend.cond``)."""
    chunked = _differentiable(backend, options, layout, present, shapes)

    def operands(args):
        q, k, v, *given = args
        given = iter(given)
        bias, mask = (next(given) if p else None for p in present[:2])
        return q, k, v, bias, mask

    def fused(*args):
        return kernel(*operands(args))

    def safe(*args):
        out, _ = chunked(*args)
        return backend.namespace().astype(out, args[0].dtype, copy=False)

    def run(*args):
        q, k, v, bias, _ = operands(args)
        finite = _fused.all_finite(backend.namespace(), q, k, v, bias)
        return backend.cond(finite, fused, safe, args)

    return backend.stage(run)
