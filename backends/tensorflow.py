"""TensorFlow adapter: ``tf.while_loop``, ``tf.recompute_grad``, ``tf.custom_gradient``.

array-api-compat has no TensorFlow namespace, so :class:`Namespace` provides the array-API
functions uniattn's algorithm calls, with the standard's names and signatures, on ``tf``
ops (``tests/test_backends.py`` checks that it covers every ``xp.*`` the algorithm uses).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import tensorflow as tf

from . import Backend, python_fori, python_scan

try:  # no public API asks whether a tape watches a tensor
    from tensorflow.python.eager.record import should_record_backprop as _watched
except ImportError:  # pragma: no cover - a TensorFlow that moved it: stage nothing

    def _watched(tensors):
        return True


# Trips of a graph's tf.while_loop in flight at once: each holds a score chunk, and two
# keep both of the project's CPU cores busy (forward at n 4096, 8 heads: 608 ms with 1,
# 462 with 2, 440 with TF's default of 10, which holds 160 MiB more).
_PARALLEL_TRIPS = 2


def _like(value, other):
    """``value`` as a tensor of ``other``'s dtype when it is a Python scalar."""
    if not isinstance(value, (int, float)):
        return value
    return tf.constant(value, dtype=getattr(other, "dtype", None))


class Namespace:
    """The subset of the array API standard that uniattn uses, on TensorFlow."""

    bool = tf.bool
    int32, int64 = tf.int32, tf.int64
    float16, bfloat16, float32, float64 = tf.float16, tf.bfloat16, tf.float32, tf.float64

    @staticmethod
    def asarray(obj, /, *, dtype=None, device=None, copy=None):
        x = tf.convert_to_tensor(obj)
        return x if dtype is None else tf.cast(x, dtype)

    @staticmethod
    def astype(x, dtype, /, *, copy=True):
        return tf.cast(x, dtype)

    @staticmethod
    def reshape(x, /, shape, *, copy=None):
        return tf.reshape(x, shape)

    @staticmethod
    def permute_dims(x, /, axes):
        return tf.transpose(x, axes)

    @staticmethod
    def matrix_transpose(x, /):
        return tf.linalg.matrix_transpose(x)

    @staticmethod
    def matmul(x1, x2, /):
        return tf.linalg.matmul(x1, x2)

    @staticmethod
    def concat(arrays, /, *, axis=0):
        return tf.concat(list(arrays), axis)

    @staticmethod
    def arange(start, /, stop=None, step=1, *, dtype=None, device=None):
        if stop is None:
            start, stop = 0, start
        return tf.range(start, stop, step, dtype=dtype or tf.int32)

    @staticmethod
    def zeros(shape, *, dtype=None, device=None):
        return tf.zeros(shape, dtype=dtype or tf.float32)

    @staticmethod
    def full(shape, fill_value, *, dtype=None, device=None):
        return tf.fill(shape, tf.constant(fill_value, dtype=dtype or tf.float32))

    @staticmethod
    def where(condition, x1, x2, /):
        x1, x2 = _like(x1, x2), _like(x2, x1)
        return tf.where(condition, x1, x2)

    @staticmethod
    def logical_and(x1, x2, /):
        return tf.logical_and(x1, x2)

    @staticmethod
    def logical_or(x1, x2, /):
        return tf.logical_or(x1, x2)

    @staticmethod
    def logical_not(x, /):
        return tf.logical_not(x)

    @staticmethod
    def isfinite(x, /):
        return tf.math.is_finite(x)

    @staticmethod
    def all(x, /, *, axis=None, keepdims=False):
        return tf.reduce_all(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def maximum(x1, x2, /):
        return tf.maximum(x1, x2)

    @staticmethod
    def minimum(x1, x2, /):
        return tf.minimum(x1, x2)

    @staticmethod
    def clip(x, /, min=None, max=None):
        x = x if min is None else tf.maximum(x, _like(min, x))
        return x if max is None else tf.minimum(x, _like(max, x))

    @staticmethod
    def zeros_like(x, /, *, dtype=None, device=None):
        return tf.zeros_like(x, dtype=dtype)

    @staticmethod
    def max(x, /, *, axis=None, keepdims=False):
        return tf.reduce_max(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def sum(x, /, *, axis=None, dtype=None, keepdims=False):
        return tf.reduce_sum(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def vecdot(x1, x2, /, *, axis=-1):
        return tf.reduce_sum(x1 * x2, axis=axis)

    @staticmethod
    def abs(x, /):
        return tf.abs(x)

    @staticmethod
    def exp(x, /):
        return tf.exp(x)

    @staticmethod
    def log(x, /):
        return tf.math.log(x)


def _leaves(tree):
    """The arrays of a (nested) structure, Nones left out."""
    return [a for a in tf.nest.flatten(tree) if a is not None]


def _rebuild(tree, leaves):
    """``tree`` with its array leaves replaced by ``leaves`` (Nones stay None)."""
    it = iter(leaves)
    return tf.nest.pack_sequence_as(
        tree, [None if a is None else next(it) for a in tf.nest.flatten(tree)]
    )


@tf.custom_gradient
def _first_order_only(x):
    """Identity whose derivative raises: the residuals of ``custom_vjp`` are computed
    without the tape (see there), so a second derivative through them would be wrong."""

    def grad(_):
        raise NotImplementedError(
            "second derivatives through uniattn's backward='custom' are not supported on "
            "TensorFlow (its forward runs off the tape to keep memory O(n·d)); "
            "PyTorch and JAX support them"
        )

    return tf.identity(x), grad


def _is_float_tensor(x):
    return isinstance(x, (tf.Tensor, tf.Variable)) and x.dtype.is_floating


class TensorFlowBackend(Backend):
    name = "tensorflow"
    # Decoding: key chunk from `bench masks`-style sweeps at a 32k cache (README, tuning).
    decode_key_chunk = 16384
    # From `python -m uniattn.bench tune` on the project's 2-core CPU (README, tuning).
    compiles_per_shape = True  # `stage` traces a graph per input shape
    default_chunks = (512, 512)

    def is_array_type(self, tp):
        return issubclass(tp, (tf.Tensor, tf.Variable))

    def namespace(self):
        return Namespace

    def version(self):
        return tf.__version__

    def prepare(self, x):
        return tf.convert_to_tensor(x)  # reads a tf.Variable (the tape still sees it)

    def find_device(self, name):
        kind, _, index = name.upper().replace("CUDA", "GPU").partition(":")
        wanted = f"{kind}:{index or 0}"
        names = [d.name for d in tf.config.list_logical_devices()]
        if not any(n.endswith(f"device:{wanted}") for n in names):
            raise ValueError(f"device: TensorFlow has no device {name!r} here (it has {names})")
        return wanted

    def platform(self, x):
        # "/job:localhost/replica:0/task:0/device:GPU:0" -> "gpu"
        return x.device.rpartition("device:")[2].partition(":")[0].lower() or "cpu"

    def device_scope(self, x):
        # TF places an op on its default device, not its inputs'; keep the inputs'.
        return tf.device(x.device) if getattr(x, "device", "") else contextlib.nullcontext()

    def stage(self, fn):
        # Eager TF allocates every op's output afresh (at n 4096, 8 heads, about 650 MB of
        # fresh pages per call on glibc); a graph reuses buffers and overlaps two chunks:
        # about 2x faster. No XLA: TF keeps every compiled shape for the process's life.
        graph = tf.function(fn, reduce_retracing=False, autograph=False)

        def staged(*args):
            # Op by op inside the caller's tf.function (traced into its graph directly)
            # and where a tape watches the inputs (backward="autodiff"): TF's gradient of
            # a function holding tf.recompute_grad in tf.while_loop mishandles captures.
            if not tf.executing_eagerly() or _watched(_leaves(args)):
                return fn(*args)
            return graph(*args)

        return staged

    def scan(self, step, init, xs, length):
        if tf.executing_eagerly():
            return python_scan(
                step, init, [tf.unstack(x, num=length) for x in xs], length, tf.stack
            )
        if length == 0:
            return init, None
        # Graph mode: peel step 0 to learn the structure of y, then a tf.while_loop over
        # TensorArrays (whose gradients stack, like lax.scan's). None leaves stay outside.
        inputs = [tf.TensorArray(x.dtype, size=length).unstack(x) for x in xs]
        carry, y = step(init, 0, tuple(t.read(0) for t in inputs))
        if length == 1:  # XLA rejects the gradient of a while loop of 0 iterations
            return carry, _rebuild(y, [a[None] for a in _leaves(y)])
        outs = [
            tf.TensorArray(a.dtype, size=length, element_shape=a.shape).write(0, a)
            for a in _leaves(y)
        ]

        def body(i, carry_leaves, outs):
            c, y_i = step(_rebuild(carry, carry_leaves), i, tuple(t.read(i) for t in inputs))
            return (
                i + 1,
                _leaves(c),
                [o.write(i, a) for o, a in zip(outs, _leaves(y_i), strict=True)],
            )

        _, carry_leaves, outs = tf.while_loop(
            lambda i, *_: i < length,
            body,
            (tf.constant(1), _leaves(carry), outs),
            maximum_iterations=length - 1,
            parallel_iterations=_PARALLEL_TRIPS,
        )
        return _rebuild(carry, carry_leaves), _rebuild(y, [o.stack() for o in outs])

    def fori_loop(self, lower, upper, body, init, max_trips):
        if tf.executing_eagerly():
            return python_fori(lower, upper, body, init)

        def loop_body(i, leaves):
            return i + 1, _leaves(body(i, _rebuild(init, leaves)))

        lower = tf.convert_to_tensor(lower, tf.int32)
        _, leaves = tf.while_loop(
            lambda i, _: i < upper,
            loop_body,
            (lower, _leaves(init)),
            maximum_iterations=max_trips,
            parallel_iterations=_PARALLEL_TRIPS,
        )
        return _rebuild(init, leaves)

    def add_at(self, x, start, update, axis):
        # A scatter of the update's rows, which takes a traced start under XLA too (tf.pad
        # and tf.slice do not). It still copies x where TF cannot reuse x's buffer, as in
        # its loops, which is why the backward accumulates through `blocks` below (README,
        # scale). x is viewed as [lead, length, trail], a free reshape.
        axis %= x.ndim
        lead = math.prod(x.shape[:axis])
        size, trail = update.shape[axis], math.prod(x.shape[axis + 1 :])
        update = tf.broadcast_to(update, [*x.shape[:axis], size, *x.shape[axis + 1 :]])
        rows = tf.range(size) + tf.cast(start, tf.int32)
        index = tf.stack(tf.meshgrid(tf.range(lead), rows, indexing="ij"), axis=-1)
        out = tf.tensor_scatter_nd_add(
            tf.reshape(x, [lead, x.shape[axis], trail]),
            index,
            tf.reshape(update, [lead, size, trail]),
        )
        return tf.reshape(out, x.shape)

    def blocks(self, zeros):
        # Held apart: TF's loops copy a carried tensor that they update (add_at copies
        # all of it per trip: at n 131072, a 32 MiB dQ per chunk pair). A TensorArray
        # (a TensorList in a graph) swaps one block per update; eagerly, a list does.
        if tf.executing_eagerly():
            return tf.unstack(zeros, num=zeros.shape[0])
        array = tf.TensorArray(zeros.dtype, size=zeros.shape[0], element_shape=zeros.shape[1:])
        return array.unstack(zeros)

    def add_block(self, blocks, index, update):
        if isinstance(blocks, list):
            blocks = list(blocks)
            blocks[int(index)] = blocks[int(index)] + update
            return blocks
        return blocks.write(index, blocks.read(index) + update)

    def stacked(self, blocks):
        return tf.stack(blocks) if isinstance(blocks, list) else blocks.stack()

    def remat(self, fn):
        # tf.recompute_grad differentiates its float tensor arguments only; everything
        # else (None, ints, positions) is bound here so that gradients reach every input.
        def rematerialised(*args):
            where = [i for i, a in enumerate(args) if _is_float_tensor(a)]

            def on_tensors(*tensors):
                full = list(args)
                for i, t in zip(where, tensors, strict=True):
                    full[i] = t
                return fn(*full)

            return tf.recompute_grad(on_tensors)(*(args[i] for i in where))

        return rematerialised

    def stop_gradient(self, x):
        return tf.stop_gradient(x)

    def softmax(self, s):
        return tf.nn.softmax(s)  # oneDNN's fused kernel where TF uses oneDNN

    def cond(self, pred, fast, safe, operands):
        return tf.cond(pred, lambda: fast(*operands), lambda: safe(*operands))

    def custom_vjp(self, fwd, bwd):
        @tf.custom_gradient
        def f(*args):
            # An eager tape records the ops run inside f and keeps their inputs (every
            # chunk's scores) alive; behind stop_gradient there is nothing to record.
            out, residuals = fwd(*(tf.stop_gradient(a) for a in args))

            def grad(*d_out):
                grads = bwd(residuals, d_out[0] if len(d_out) == 1 else d_out)
                return tuple(None if g is None else _first_order_only(g) for g in grads)

            return out, grad

        return f

    def asarray(self, a, dtype=None):
        where = self.array_device
        with contextlib.nullcontext() if where is None else tf.device(where):
            t = tf.constant(np.array(a, copy=True))
            return t if dtype is None else tf.cast(t, getattr(tf, dtype))

    def to_numpy(self, x):
        if x.dtype.is_floating and x.dtype.size < 4:
            x = tf.cast(x, tf.float32)
        return np.array(x.numpy(), copy=True)

    def vjp(self, fn, *primals):
        primals = [tf.identity(p) for p in primals]
        with tf.GradientTape() as tape:
            for p in primals:
                tape.watch(p)
            out = fn(*primals)

        def vjp_fn(d_out):
            return tuple(
                tape.gradient(
                    out,
                    primals,
                    output_gradients=d_out,
                    unconnected_gradients=tf.UnconnectedGradients.ZERO,
                )
            )

        return out, vjp_fn

    def reset_peak_memory(self):
        # With oneDNN on (TF's default on CPUs with AVX-512 VNNI/BF16 or AMX), large
        # tensors come from a pooling allocator whose pages stay resident after a call:
        # peak RSS would read 0. It keeps statistics; TF's plain CPU allocator does not.
        try:
            tf.config.experimental.reset_memory_stats("CPU:0")
            return tf.config.experimental.get_memory_info("CPU:0")["current"]
        except ValueError:  # "Allocator stats not available"
            return None

    def peak_memory(self):
        return tf.config.experimental.get_memory_info("CPU:0")["peak"]

    def jit(self, fn):
        # uniattn needs no AutoGraph (its loops are tf.while_loop); leaving it off keeps
        # AutoGraph from converting the test harness, whose conversion cache was seen to
        # hand one function's converted code to another late in a long test session.
        # test_compiled.py checks a tf.function with AutoGraph on.
        return tf.function(fn, jit_compile=True, reduce_retracing=False, autograph=False)


backend = TensorFlowBackend()
