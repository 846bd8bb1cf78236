"""Framework adapters, installed as ``uniattn.backends``.

Each adapter is one module defining ``backend``, an instance of a :class:`Backend`
subclass. The algorithm in ``uniattn`` only ever talks to that interface and to the
array namespace the adapter returns, so a new framework is one file here plus its
line in :data:`REGISTRY`; the conformance suite then runs against it unchanged.

An adapter module imports its framework at import time, but it is only imported once
that framework is already in ``sys.modules`` (see ``uniattn._dispatch``): importing
``uniattn`` never imports a framework.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

#: Backend name -> the top-level module of its framework. The name is also the adapter
#: module's name in this package. Order is the order of detection and of the test matrix.
REGISTRY: dict[str, str] = {
    "numpy": "numpy",
    "jax": "jax",
    "torch": "torch",
    "tensorflow": "tensorflow",
}

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
LOG2_E = 1.4426950408889634  # exp(x) = 2 ** (x * log2(e)): for adapters with a faster exp2


def load(name: str) -> Backend:
    """Import and return the adapter called ``name`` (this imports its framework)."""
    if name not in REGISTRY:
        raise ValueError(f"backend must be one of {sorted(REGISTRY)}; got {name!r}")
    # An adapter already imported is looked up, not imported again: torch.compile traces
    # a dict lookup but not importlib, which would break its graph.
    if loaded(name):
        return sys.modules[f"{__name__}.{name}"].backend
    return importlib.import_module(f"{__name__}.{name}").backend


def harness(name: str) -> Backend:
    """What tests, benchmarks and the CLI use of the backend called ``name``: conversion to
    and from NumPy, the framework's autodiff and compiler, timing and memory."""
    return load(name)


def loaded(name: str) -> bool:
    """Whether the adapter called ``name`` is imported."""
    return f"{__name__}.{name}" in sys.modules


def installed() -> list[str]:
    """Names of the backends whose framework can be imported (imports nothing)."""
    return [name for name, module in REGISTRY.items() if importlib.util.find_spec(module)]


def python_scan(step: Callable, init: Any, slices: Sequence, length: int, stack: Callable):
    """:meth:`Backend.scan` as a Python loop, for eager frameworks.

    ``slices[j][i]`` is step ``i``'s value of ``xs[j]``; ``stack`` stacks a list of arrays.
    """
    carry, ys = init, []
    for i in range(length):
        carry, y = step(carry, i, tuple(s[i] for s in slices))
        ys.append(y)
    if not ys or ys[0] is None:
        return carry, None
    if isinstance(ys[0], tuple):
        return carry, tuple(None if p[0] is None else stack(list(p)) for p in zip(*ys, strict=True))
    return carry, stack(ys)


def python_fori(lower: Any, upper: Any, body: Callable, init: Any) -> Any:
    """:meth:`Backend.fori_loop` as a Python loop (bounds may be 0-d arrays)."""
    carry = init
    for i in range(int(lower), int(upper)):
        carry = body(i, carry)
    return carry


def _same(*arrays):
    return arrays


class Backend:
    """What uniattn needs from a framework.

    The algorithm uses the array namespace plus four primitives with the semantics of
    Keras 3's backends: :meth:`scan` (``lax.scan``), :meth:`remat`, :meth:`stop_gradient`
    and :meth:`custom_vjp`. The remaining methods convert to and from NumPy and reach the
    framework's own autodiff and compiler; the conformance suite, ``python -m uniattn``
    and the benchmarks use them.
    """

    #: Registry name, e.g. ``"torch"``.
    name: str
    #: Float dtypes this backend computes in.
    dtypes: tuple[str, ...] = FLOAT_DTYPES
    #: Whether :meth:`vjp` (the framework's own reverse-mode autodiff) exists.
    has_autodiff: bool = True
    #: Whether :meth:`stage` compiles once per input shape (so a benchmark warms up every
    #: length, not only the first, before it measures time and memory).
    compiles_per_shape: bool = False
    #: Default (query_chunk_size, key_chunk_size), from ``python -m uniattn.bench tune``.
    default_chunks: tuple[int, int] = (256, 512)
    #: Default key_chunk_size for decoding (one query row, whose folded heads are all the
    #: rows a key chunk's fixed cost is spread over), from ``bench masks``' decode rows.
    decode_key_chunk: int = 4096
    #: Default chunks on an accelerator, where a chunk is a few kernel launches whose fixed
    #: cost larger chunks spread: the paper's 1024 x 4096 (`bench tune --device cuda` on an
    #: H100 ran 4096 x 4096 fastest, within 1.12x (JAX) and 1.52x (torch); README, tuning).
    accelerator_chunks: tuple[int, int] = (1024, 4096)
    #: Where :meth:`asarray` creates arrays: a device of the framework's own kind, or None
    #: for the framework's default. Set by :meth:`on`; the algorithm never reads it.
    array_device: Any = None

    def chunk_sizes(self, device: Any, decoding: bool) -> tuple[int, int]:
        """Default (query_chunk_size, key_chunk_size) for arrays on ``device``:
        :attr:`default_chunks` on the host CPU, :attr:`accelerator_chunks` elsewhere."""
        chunks = self.accelerator_chunks if self.is_accelerator(device) else self.default_chunks
        return chunks[0], self.decode_key_chunk if decoding else chunks[1]

    def is_accelerator(self, device: Any) -> bool:
        """Whether ``device`` (as :meth:`device` gives it) is not the host CPU."""
        return False

    def on(self, device: str) -> Backend:
        """A copy of this backend whose :meth:`asarray` creates arrays on ``device``.

        ``device`` is the framework's own name for it (torch ``"cuda:1"``, JAX ``"gpu"``,
        TensorFlow ``"GPU:0"``; ``"cpu"`` everywhere). The conformance suite and the
        benchmarks take it as ``--device``. Raises ValueError for a device the framework
        does not have.
        """
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

    # -- identification -----------------------------------------------------------------
    def is_array_type(self, tp: type) -> bool:
        """Whether instances of ``tp`` are this framework's arrays."""
        raise NotImplementedError

    def namespace(self) -> ModuleType | Any:
        """The array-API namespace the algorithm computes with."""
        raise NotImplementedError

    def version(self) -> str:
        """The framework's version string."""
        raise NotImplementedError

    def prepare(self, x: Any) -> Any:
        """Turn an accepted input (e.g. a ``tf.Variable``) into a plain array."""
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

    def stage(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` prepared for repeated eager calls with the same static options.

        uniattn stages each (options) variant of the algorithm once; a framework that
        would otherwise re-trace its loops on every eager call (JAX) compiles here.
        """
        return fn

    # -- primitives used by the algorithm ---------------------------------------------
    def scan(
        self,
        step: Callable[[Any, Any, tuple], tuple[Any, Any]],
        init: Any,
        xs: Sequence[Any],
        length: int,
    ) -> tuple[Any, Any]:
        """``lax.scan`` that also passes the index: ``step(carry, i, x_i) -> (carry, y_i)``.

        ``carry`` is a tuple of arrays and Nones (possibly empty) whose shapes and dtypes
        do not change; ``xs`` is a tuple of arrays of leading size ``length``; ``i`` is a
        Python int in an eager loop, an int32 scalar array in a traced one; ``y_i`` is
        None, an array or a tuple of arrays and Nones. Returns the final carry and the
        ``y_i`` stacked on a new leading axis, with the structure of ``y_i``.
        """
        raise NotImplementedError

    def fori_loop(
        self, lower: Any, upper: Any, body: Callable[[Any, Any], Any], init: Any, max_trips: int
    ) -> Any:
        """``carry = body(i, carry)`` for ``i`` in ``range(lower, upper)``; returns ``carry``.

        The bounds are Python ints or int scalar arrays (traced or data-dependent); the
        caller guarantees ``upper - lower <= max_trips`` (a static bound, for compilers).
        ``carry`` is as in :meth:`scan`. Differentiable in reverse mode wherever the
        framework's loops are: the work skipped by the bounds is never computed.
        """
        raise NotImplementedError

    def chunks(self, stacked: Any) -> Any:
        """``stacked`` (chunks on axis 0) as a loop body indexes it: ``chunks(s)[i]``.

        The default is the array itself. An adapter may store it otherwise where its
        compiler would copy the stacked array into the loop (JAX keeps it flat). The result
        is passed to :meth:`remat`-wrapped functions, so it must be something they accept
        as an argument (an array; on JAX, a pytree of arrays).
        """
        return stacked

    def add_at(self, x: Any, start: Any, update: Any, axis: int) -> Any:
        """``x`` plus ``update`` on ``[start, start + update.shape[axis])`` along ``axis``.

        Functional semantics, but ``x`` may be updated in place: the caller never uses
        ``x`` again (like a donated buffer). ``start`` is an int or an int scalar array.
        """
        raise NotImplementedError

    def blocks(self, zeros: Any) -> Any:
        """An accumulator of ``zeros.shape[0]`` blocks, all 0, for :meth:`add_block`.

        ``zeros`` stacks them on axis 0. The default is that array itself; an adapter whose
        loops copy a carried array may hold the blocks apart (each update then touches one
        block, not all of them).
        """
        return zeros

    def add_block(self, blocks: Any, index: Any, update: Any) -> Any:
        """``blocks`` with ``update`` added to block ``index`` (an int or int scalar array).

        Functional semantics, but ``blocks`` may be updated in place (as :meth:`add_at`).
        """
        return self.add_at(blocks, index, update[None, ...], 0)

    def stacked(self, blocks: Any) -> Any:
        """The blocks of an accumulator, stacked on axis 0 in one array."""
        return blocks

    def remat(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` whose intermediate values are recomputed in the backward pass.

        ``fn`` takes arrays (and Python scalars) positionally and returns an array or
        a tuple of arrays; gradients flow to every float argument.
        """
        return fn

    def stop_gradient(self, x: Any) -> Any:
        """``x`` treated as a constant by autodiff."""
        return x

    def matmul_transposed(self, a: Any, b: Any) -> Any:
        """``a @ bᵀ`` over the last two axes: the score product of queries and keys.

        The default multiplies by ``matrix_transpose(b)``, a view in eager frameworks; an
        adapter whose compiler would copy ``b`` transposed contracts the last axes directly.
        """
        xp = self.namespace()
        return xp.matmul(a, xp.matrix_transpose(b))

    def exp_shifted(self, s: Any, shift: Any) -> Any:
        """``exp(s - shift)``, to a few ulp; ``s`` is a temporary the caller never reads
        again, so an adapter may compute it in place where autodiff does not need ``s``."""
        return self.namespace().exp(s - shift)

    def row_sums(self, p: Any) -> Any:
        """``sum(p, axis=-1, keepdims=True)``: the row sums of a block of probabilities."""
        return self.namespace().sum(p, axis=-1, keepdims=True)

    def softmax(self, s: Any) -> Any:
        """``softmax(s)`` over the last axis, through the framework's own function where it
        has one. Only plain attention uses it (:mod:`uniattn._plain`, the benchmarks'
        baseline), which is meant to be what a user of that framework would write."""
        xp = self.namespace()
        e = xp.exp(s - xp.max(s, axis=-1, keepdims=True))
        return e / xp.sum(e, axis=-1, keepdims=True)

    def cond(self, pred: Any, fast: Callable[..., Any], safe: Callable[..., Any], operands: tuple):
        """``fast(*operands)`` if the 0-d bool ``pred`` holds, else ``safe(*operands)``.

        ``safe`` must be right whatever ``pred`` says, so an adapter that cannot branch on
        a value (a tracing compiler without a conditional) may always take it. The default
        branches in Python (eager frameworks).
        """
        return fast(*operands) if bool(pred) else safe(*operands)

    def cond_call(
        self,
        pred: Any,
        fn: Callable[..., Any],
        sanitize: Callable[..., tuple],
        operands: tuple,
        passed: tuple = (),
    ):
        """``fn(*operands, *passed)`` if the 0-d bool ``pred`` holds, else
        ``fn(*sanitize(*operands), *passed)``.

        The default branches on ``operands`` alone (:meth:`cond`), so a graph holds ``fn``
        once and ``passed`` never wait for the branch; an adapter whose conditional copies
        the results it passes on (XLA) branches around ``fn`` instead.
        """
        return fn(*self.cond(pred, _same, sanitize, operands), *passed)

    def custom_vjp(
        self,
        fwd: Callable[..., tuple[Any, Any]],
        bwd: Callable[[Any, Any], tuple[Any, ...]],
    ) -> Callable[..., Any]:
        """A function ``f(*arrays)`` whose reverse-mode derivative is given by hand.

        ``fwd(*arrays) -> (out, residuals)`` computes ``f``; ``bwd(residuals, d_out)``
        returns one cotangent per argument of ``f`` (None for a non-float argument).
        ``out`` is an array or a tuple of arrays and ``d_out`` has the same structure.
        """
        raise NotImplementedError

    # -- conversion, autodiff and compilation (tests, CLI, benchmarks) -----------------
    def asarray(self, a: np.ndarray, dtype: str | None = None) -> Any:
        """A framework array with the values of ``a``, cast to ``dtype`` if given, on
        :attr:`array_device`."""
        raise NotImplementedError

    def to_numpy(self, x: Any) -> np.ndarray:
        """A NumPy copy of ``x``; 16-bit floats come back as float32."""
        raise NotImplementedError

    def vjp(self, fn: Callable[..., Any], *primals: Any) -> tuple[Any, Callable[[Any], tuple]]:
        """``(fn(*primals), vjp_fn)`` by the framework's own reverse-mode autodiff.

        ``vjp_fn(d_out)`` returns one cotangent per primal; call it once (TensorFlow's
        tape is not persistent: a persistent one cannot differentiate a recomputed
        while loop inside ``tf.function``).
        """
        raise NotImplementedError(f"{self.name} has no autodiff")

    def jit(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` compiled by the framework's compiler (identity if it has none)."""
        return fn

    def precompile(self, fn: Callable[..., Any], *args: Any) -> Callable[..., Any]:
        """``fn`` ready to run on ``args`` with nothing left to compile or load.

        The default runs it once (a warm-up); a framework whose allocator keeps what a
        warm-up freed (XLA) compiles ahead of time instead, so that a measurement of the
        next run's peak memory starts from a clean baseline.
        """
        self.block(fn(*args))
        return fn

    def block(self, x: Any) -> Any:
        """Wait until ``x`` is computed (asynchronous frameworks); returns ``x``."""
        return x

    def reset_peak_memory(self) -> int | None:
        """Start measuring the peak of the framework's own allocator: reset its peak
        statistic and return the bytes it holds now; None where it keeps no statistics.

        Peak RSS cannot see memory that a pooling allocator reuses (TensorFlow's, with
        oneDNN on), so measurements take the larger of the two (``uniattn._measure``).
        On an accelerator these statistics are the only measure: an adapter without them
        (None) leaves that device's memory unmeasured.
        """
        return None

    def peak_memory(self) -> int:
        """The allocator's peak in bytes since :meth:`reset_peak_memory` (which returned
        a number)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        where = "" if self.array_device is None else f" on {self.array_device}"
        return f"<uniattn backend {self.name!r}{where}>"
