"""The two interfaces an adapter implements: :class:`Backend` and :class:`Harness`.

:class:`Backend` is what the algorithm needs from a framework: its array namespace, its
loops, rematerialisation, ``stop_gradient``, custom gradients, a conditional and staging.
Every method has a default that is right for an eager framework with no autodiff, so a
minimal adapter names its arrays and its namespace; the performance hooks at the end are
optional overrides, kept where a measurement shows they pay (``docs/backends.md``).

:class:`Harness` is what the conformance suite, the benchmarks and ``python -m uniattn``
need besides: conversion to and from NumPy, the framework's own autodiff and compiler,
waiting for results, devices and memory statistics. uniattn's algorithm never calls it.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
LOG2_E = 1.4426950408889634  # exp(x) = 2 ** (x * log2(e)), for adapters with a faster exp2


class Backend:
    """What uniattn's algorithm needs from a framework.

    The loop, rematerialisation and custom-gradient methods have the semantics of Keras 3's
    backends (``scan``, ``remat``, ``custom_gradient``). Arguments called ``carry`` are
    tuples (or lists) of arrays and Nones whose shapes and dtypes do not change.
    """

    #: Registry name, e.g. ``"torch"``.
    name: str
    #: Float dtypes this backend computes in.
    dtypes: tuple[str, ...] = FLOAT_DTYPES
    #: Whether :meth:`vjp` (the framework's own reverse-mode autodiff) exists.
    has_autodiff: bool = False
    #: Whether :meth:`stage` compiles once per input shape (uniattn then caches its staged
    #: functions per shape, and a benchmark warms up every length before it measures).
    compiles_per_shape: bool = False
    #: Default (query_chunk_size, key_chunk_size) on the host CPU and on an accelerator
    #: (``python -m uniattn.bench tune``), and the key chunk of a single query row.
    default_chunks: tuple[int, int] = (256, 512)
    accelerator_chunks: tuple[int, int] = (1024, 4096)
    decode_key_chunk: int = 4096

    # -- identification ----------------------------------------------------------------
    def is_array_type(self, tp: type) -> bool:
        """Whether instances of ``tp`` are this framework's arrays."""
        raise NotImplementedError

    def namespace(self) -> ModuleType | Any:
        """The array-API namespace the algorithm computes with."""
        raise NotImplementedError

    def prepare(self, x: Any) -> Any:
        """An accepted input (e.g. a ``tf.Variable``) as a plain array."""
        return x

    def dtype_name(self, x: Any) -> str:
        """The dtype of ``x`` as a NumPy-style name: ``"float32"``, ``"bool"``..."""
        return str(x.dtype.name)

    def device(self, x: Any) -> Any:
        """The device to create new arrays on, as the namespace's ``device=`` expects."""
        return None

    def device_scope(self, x: Any) -> Any:
        """A context manager in which new computations stay on ``x``'s device."""
        return contextlib.nullcontext()

    def is_accelerator(self, device: Any) -> bool:
        """Whether ``device`` (as :meth:`device` gives it) is not the host CPU."""
        return False

    def chunk_sizes(self, device: Any, decoding: bool) -> tuple[int, int]:
        """Default (query_chunk_size, key_chunk_size) for arrays on ``device``."""
        chunks = self.accelerator_chunks if self.is_accelerator(device) else self.default_chunks
        return chunks[0], self.decode_key_chunk if decoding else chunks[1]

    # -- control flow and differentiation ----------------------------------------------
    def stage(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` prepared for repeated eager calls with the same static options: a
        framework that would re-trace its loops on every eager call compiles it here."""
        return fn

    def scan(
        self,
        step: Callable[[Any, Any, tuple], tuple[Any, Any]],
        init: Any,
        xs: Sequence,
        length: int,
    ) -> tuple[Any, Any]:
        """``lax.scan`` that also passes the index: ``step(carry, i, x_i) -> (carry, y_i)``.

        ``xs`` is a tuple of arrays of leading size ``length``; ``i`` is a Python int in an
        eager loop, an int32 0-d array in a traced one; ``y_i`` is None, an array or a
        tuple of arrays and Nones. Returns the final carry and the ``y_i`` stacked on a new
        leading axis. The default is a Python loop.
        """
        return python_scan(step, init, xs, length, self.namespace().stack)

    def fori_loop(
        self, lower: Any, upper: Any, body: Callable[[Any, Any], Any], init: Any, max_trips: int
    ) -> Any:
        """``carry = body(i, carry)`` for ``i`` in ``range(lower, upper)``; returns ``carry``.

        The bounds are Python ints or int 0-d arrays (traced or data-dependent), with
        ``upper - lower <= max_trips`` (a static bound, for compilers). Differentiable in
        reverse mode wherever the framework's loops are. The default is a Python loop.
        """
        return python_fori(lower, upper, body, init)

    def remat(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` whose intermediates are recomputed in the backward pass. ``fn`` takes
        arrays (and Python scalars) positionally; gradients flow to every float argument."""
        return fn

    def stop_gradient(self, x: Any) -> Any:
        """``x`` treated as a constant by autodiff."""
        return x

    def concrete_ints(self, x: Any) -> Any:
        """The values of the int array ``x`` as Python ints (nested lists, as ``tolist``
        gives them) where they are known now, or None where they are traced or lazy.

        The loops' bounds that lengths and segment ids set are then computed in Python,
        once per call, rather than as small array operations per row block. The default
        is None: they stay arrays.
        """
        return None

    def cond(self, pred: Any, fast: Callable[..., Any], safe: Callable[..., Any], operands: tuple):
        """``fast(*operands)`` if the 0-d bool ``pred`` holds, else ``safe(*operands)``.

        ``safe`` is right whatever ``pred`` says, so an adapter that cannot branch on a
        value may always take it. The default branches in Python.
        """
        return fast(*operands) if bool(pred) else safe(*operands)

    def custom_vjp(
        self, fwd: Callable[..., tuple[Any, Any]], bwd: Callable[[Any, Any], tuple[Any, ...]]
    ) -> Callable[..., Any]:
        """A function ``f(*arrays)`` whose reverse-mode derivative is given by hand.

        ``fwd(*arrays) -> (out, residuals)`` computes ``f``; ``bwd(residuals, d_out)``
        returns one cotangent per argument of ``f`` (None for a non-float argument).
        ``out`` is an array or a tuple of arrays and ``d_out`` has the same structure. The
        default (no autodiff) is ``f`` alone.
        """
        return lambda *args: fwd(*args)[0]

    def vjp(self, fn: Callable[..., Any], *primals: Any) -> tuple[Any, Callable[[Any], tuple]]:
        """``(fn(*primals), vjp_fn)`` by the framework's own reverse-mode autodiff, for
        ``uniattn.vjp(backward="autodiff")``; ``vjp_fn(d_out)`` returns one cotangent per
        primal and is called once."""
        raise NotImplementedError(f"{self.name} has no autodiff")

    # -- the framework's own fused kernel ---------------------------------------------
    def fused(self, call: Any, arrays: Any) -> Callable[..., Any] | str:
        """The framework's own fused attention kernel for a call, or why it has none.

        ``call`` (:class:`uniattn._fused.FusedCall`) describes the call statically, with
        ``call.reason`` set where an option of it has no fused equivalent; ``arrays``
        (:class:`uniattn._algorithm.Operands`, in the user's layout) tell what only they
        can: their device, whether autodiff watches the bias. Returns
        ``kernel(q, k, v, bias, mask) -> out``, the output in the user's layout and dtype,
        computing exactly uniattn's result for finite inputs (uniattn takes the chunked
        algorithm for the others), differentiable by the framework's autodiff, and the
        same function for equal ``call`` (staged functions are cached on it); or a
        sentence saying why not: the framework's own first reason (no kernel on this
        device), then ``call.reason``, then what its kernel lacks. The default has no
        kernel.
        """
        return f"{self.name} has no fused attention kernel"

    # -- optional performance hooks ----------------------------------------------------
    def multiplies_16bit(self, device: Any) -> bool:
        """Whether :meth:`matmul` multiplies float16 and bfloat16 operands on ``device``
        into a float32 result with float32 accumulation faster than float32 operands.

        Where it does, the algorithm hands it the 16-bit inputs as they are and rounds its
        float32 operands (probabilities, score gradients, scaled queries) to the inputs'
        dtype, as FlashAttention does; elsewhere it lifts every operand to float32 once. The
        default is False.
        """
        return False

    def matmul(self, a: Any, b: Any, *, transposed: bool = False) -> Any:
        """``a @ b`` (``a @ bᵀ`` if ``transposed``) over the last two axes, batch axes
        broadcast, for operands of one dtype: every product of the algorithm.

        16-bit operands give a float32 result with float32 accumulation. The default
        lifts them to float32 first (exact products); an adapter whose framework has a
        16-bit product into float32 (tensor cores) uses it and says so in
        :meth:`multiplies_16bit`.
        """
        xp = self.namespace()
        if self.dtype_name(a) in ("float16", "bfloat16"):
            a, b = xp.astype(a, xp.float32), xp.astype(b, xp.float32)
        return xp.matmul(a, xp.matrix_transpose(b) if transposed else b)

    def masked(self, s: Any, allowed: Any, nan_free: bool = False) -> Any:
        """``s`` with ``-inf`` where the bool ``allowed`` (broadcast to ``s``'s shape) is
        False. ``s`` is a temporary the caller never reads again: an adapter may overwrite
        it where autodiff does not need it.

        ``nan_free`` says that ``s`` holds no NaN (scores of finite inputs with no bias: a
        NaN would need a product that overflows float32), so a NaN-propagating minimum
        with ``+inf``/``-inf`` serves as well.
        """
        return self.namespace().where(allowed, s, float("-inf"))

    def keep_mask(self, hashed: Any, least: int) -> Any:
        """Dropout's mask of the int32 hash block ``hashed``: kept where ``hashed >=
        least`` (``least`` is above int32's minimum), in whatever form :meth:`dropped`
        takes; the default is that comparison's bool array. ``hashed`` is a temporary the
        caller never reads again."""
        return hashed >= least

    def dropped(self, x: Any, keep: Any, scale: float) -> Any:
        """``x * scale`` where the mask ``keep`` (:meth:`keep_mask`, broadcast to ``x``'s
        shape) keeps an entry, and 0 where it drops it: dropout. ``x`` is a temporary the
        caller never reads again: an adapter may overwrite it where autodiff does not need
        it.

        Where autodiff does not watch ``x``, an adapter may multiply by the mask, which
        leaves a dropped NaN or inf non-finite: the blocks dropped are finite on every row
        whose result is (a row that attends a non-finite input is NaN whatever its
        dropout). Under autodiff a dropped entry is 0, and so is its gradient.
        """
        return self.namespace().where(keep, x * scale, 0.0)

    def exp_shifted(self, s: Any, shift: Any) -> Any:
        """``exp(s - shift)`` to a few ulp. ``s`` is a temporary the caller never reads
        again: an adapter may overwrite it where autodiff does not need it."""
        return self.namespace().exp(s - shift)

    def row_sums(self, p: Any) -> Any:
        """``sum(p, axis=-1, keepdims=True)``: the row sums of a block of probabilities."""
        return self.namespace().sum(p, axis=-1, keepdims=True)

    def chunks(self, stacked: Any) -> Any:
        """``stacked`` (chunks on axis 0) as a loop body indexes it: ``chunks(s)[i, ...]``.

        The result is passed to :meth:`remat`-wrapped functions, so it must be something
        they accept as an argument. The default is the array itself.
        """
        return stacked

    def blocks(self, zeros: Any) -> Any:
        """An accumulator of ``zeros.shape[0]`` blocks, all 0, for :meth:`add_block`.

        ``zeros`` stacks them on axis 0. The default holds them as a Python list (eager
        loops); an adapter whose loops are traced holds them its own way.
        """
        return [zeros[i, ...] for i in range(zeros.shape[0])]

    def add_block(self, blocks: Any, index: Any, update: Any) -> Any:
        """``blocks`` with ``update`` added to block ``index`` (an int or int 0-d array).
        Functional semantics; the caller never uses ``blocks`` again."""
        blocks = list(blocks)
        blocks[int(index)] = blocks[int(index)] + update
        return blocks

    def stacked(self, blocks: Any) -> Any:
        """The blocks of an accumulator, stacked on axis 0 in one array."""
        return self.namespace().stack(blocks)

    def cond_call(
        self,
        pred: Any,
        fn: Callable[..., Any],
        sanitize: Callable[..., tuple],
        operands: tuple,
        passed: tuple = (),
        reuse: int = 1,
    ):
        """``fn(*operands, *passed)`` if the 0-d bool ``pred`` holds, else
        ``fn(*sanitize(*operands), *passed)``.

        ``sanitize`` is elementwise and leaves ``fn``'s result unchanged where ``pred``
        holds, so an adapter may always take it. An adapter that knows it takes the branch
        where ``pred`` holds may call ``fn(*operands, *passed, finite=True)``: ``fn`` may
        then rely on the operands being finite. ``reuse`` says about how often ``fn`` reads
        each operand entry (the query rows each key meets), hence what a pass over the
        operands costs against ``fn``. The default branches on ``operands`` alone
        (:meth:`cond`), so a graph holds ``fn`` once; an adapter whose conditional copies
        the arrays it returns branches around ``fn`` instead.
        """
        return fn(*self.cond(pred, _identity, sanitize, operands), *passed)

    # -- ring attention (``uniattn.ring_attention``) -----------------------------------
    def ring(self, axis_name: Any, group: Any) -> Ring:
        """The ring of ranks a sequence is sharded over (:class:`Ring`). The default: none."""
        raise NotImplementedError(
            f"ring_attention runs on JAX (inside jax.shard_map, with axis_name) and on "
            f"PyTorch (over a torch.distributed process group); {self.name} has no "
            f"collective communication for it to use"
        )

    def __repr__(self) -> str:
        return f"<uniattn backend {self.name!r}>"


class Ring:
    """The ranks ring attention runs on, as an adapter's :meth:`Backend.ring` gives them.

    ``size`` is a Python int; ``rank`` an int, or a 0-d int array where the framework
    traces it (JAX's ``axis_index``).
    """

    size: int
    rank: Any

    def shift(self, arrays: tuple) -> Callable[[], tuple]:
        """Start sending each of ``arrays`` (Nones stay None) to rank ``rank + 1`` and
        receiving rank ``rank - 1``'s (modulo ``size``); the returned function waits and
        returns what arrived. Work issued before calling it overlaps the transfer."""
        raise NotImplementedError

    def sum_replicated(self, x: Any) -> Any:
        """The cotangent of an argument every rank holds the same copy of (sinks), given
        this rank's share ``x``: the sum over ranks, where the framework does not add it."""
        raise NotImplementedError

    def check_same_length(self, length: int) -> None:
        """Raise ValueError unless every rank's shard has ``length`` positions."""


def _identity(*arrays):
    return arrays


def python_scan(step: Callable, init: Any, slices: Sequence, length: int, stack: Callable):
    """:meth:`Backend.scan` as a Python loop: ``slices[j][i]`` is step ``i``'s value of
    ``xs[j]``; ``stack`` stacks a list of arrays."""
    carry, ys = init, []
    for i in range(length):
        carry, y = step(carry, i, tuple(_step_slice(s, i) for s in slices))
        ys.append(y)
    if not ys or ys[0] is None:
        return carry, None
    if isinstance(ys[0], tuple):
        return carry, tuple(None if p[0] is None else stack(list(p)) for p in zip(*ys, strict=True))
    return carry, stack(ys)


def _step_slice(s: Any, i: int) -> Any:
    """Step ``i``'s slice of ``s``: an array's along its leading axis (``s[i, ...]``: the
    standard leaves ``s[i]`` of an array of several axes unspecified), or a sequence's item."""
    return s[i] if isinstance(s, (tuple, list)) else s[i, ...]


def python_fori(lower: Any, upper: Any, body: Callable, init: Any) -> Any:
    """:meth:`Backend.fori_loop` as a Python loop (bounds may be 0-d arrays)."""
    carry = init
    for i in range(int(lower), int(upper)):
        carry = body(i, carry)
    return carry


class Harness:
    """What tests, benchmarks and the CLI need of a framework besides :class:`Backend`.

    Parameters
    ----------
    adapter : Backend
        The framework's adapter. :attr:`name`, :attr:`dtypes`, :attr:`has_autodiff` and
        the methods :meth:`namespace`, :meth:`vjp`, :meth:`stage`, :meth:`device`,
        :meth:`dtype_name`, :meth:`is_array_type`, :meth:`is_accelerator` and
        :meth:`chunk_sizes` are the adapter's.
    """

    #: Where :meth:`asarray` creates arrays (None: the framework's default); see :meth:`on`.
    array_device: Any = None

    def __init__(self, adapter: Backend):
        self.adapter = adapter

    @property
    def name(self) -> str:
        return self.adapter.name

    @property
    def dtypes(self) -> tuple[str, ...]:
        return self.adapter.dtypes

    @property
    def has_autodiff(self) -> bool:
        return self.adapter.has_autodiff

    @property
    def compiles_per_shape(self) -> bool:
        return self.adapter.compiles_per_shape

    def namespace(self) -> Any:
        return self.adapter.namespace()

    def vjp(self, fn: Callable[..., Any], *primals: Any) -> tuple[Any, Callable[[Any], tuple]]:
        """:meth:`Backend.vjp`."""
        return self.adapter.vjp(fn, *primals)

    def stage(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """:meth:`Backend.stage`."""
        return self.adapter.stage(fn)

    def device(self, x: Any) -> Any:
        return self.adapter.device(x)

    def dtype_name(self, x: Any) -> str:
        return self.adapter.dtype_name(x)

    def is_array_type(self, tp: type) -> bool:
        return self.adapter.is_array_type(tp)

    def is_accelerator(self, device: Any) -> bool:
        return self.adapter.is_accelerator(device)

    def chunk_sizes(self, device: Any, decoding: bool) -> tuple[int, int]:
        return self.adapter.chunk_sizes(device, decoding)

    def version(self) -> str:
        """The framework's version string."""
        raise NotImplementedError

    # -- arrays and devices -----------------------------------------------------------
    def asarray(self, a: np.ndarray, dtype: str | None = None) -> Any:
        """A framework array with the values of ``a``, cast to ``dtype`` if given, on
        :attr:`array_device`."""
        raise NotImplementedError

    def to_numpy(self, x: Any) -> np.ndarray:
        """A NumPy copy of ``x``; 16-bit floats come back as float32."""
        raise NotImplementedError

    def on(self, device: str) -> Harness:
        """A copy whose :meth:`asarray` creates arrays on ``device``, the framework's own
        name for it (torch ``"cuda:1"``, JAX ``"gpu"``, TensorFlow ``"GPU:0"``, ``"cpu"``).
        Raises ValueError for a device the framework does not have."""
        placed = copy.copy(self)
        placed.array_device = self.find_device(device)
        return placed

    def find_device(self, name: str) -> Any:
        """The framework's device called ``name``, for :meth:`on`."""
        if name.lower() != "cpu":
            raise ValueError(f"device must be 'cpu' for {self.name}; got {name!r}")
        return "cpu"

    def platform(self, x: Any) -> str:
        """The kind of device ``x`` lives on, lower case: ``"cpu"``, ``"cuda"``, ``"gpu"``..."""
        return "cpu"

    def array_platform(self) -> str:
        """:meth:`platform` of the arrays :meth:`asarray` creates."""
        import numpy as np

        return self.platform(self.asarray(np.zeros(1)))

    # -- compiling, timing and memory --------------------------------------------------
    def jit(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` compiled by the framework's compiler (itself if there is none)."""
        return fn

    def precompile(self, fn: Callable[..., Any], *args: Any) -> Callable[..., Any]:
        """``fn`` ready to run on ``args`` with nothing left to compile or load. The
        default runs it once; an adapter whose allocator keeps what a warm-up freed
        compiles ahead of time instead, so that a peak measured next starts clean."""
        self.block(fn(*args))
        return fn

    def block(self, x: Any) -> Any:
        """Wait until ``x`` is computed (asynchronous frameworks); returns ``x``."""
        return x

    def reset_peak_memory(self) -> int | None:
        """Reset the peak statistic of the framework's own allocator and return the bytes
        it holds now; None where it keeps no statistics (then peak RSS is the measure)."""
        return None

    def peak_memory(self) -> int:
        """The allocator's peak in bytes since :meth:`reset_peak_memory`."""
        raise NotImplementedError

    def softmax(self, s: Any) -> Any:
        """``softmax(s)`` over the last axis, by the framework's own function where it has
        one: plain attention, the benchmarks' baseline, is what a user would write."""
        xp = self.namespace()
        e = xp.exp(s - xp.max(s, axis=-1, keepdims=True))
        return e / xp.sum(e, axis=-1, keepdims=True)

    def __repr__(self) -> str:
        where = "" if self.array_device is None else f" on {self.array_device}"
        return f"<uniattn harness {self.name!r}{where}>"
