"""TensorFlow adapter: ``tf.while_loop``, ``tf.recompute_grad``, ``tf.custom_gradient``.

Eagerly, loops are Python loops; staged (:meth:`TensorFlowBackend.stage`, or inside the
caller's ``tf.function``) they are ``tf.while_loop``. The array namespace is in
``_tensorflow_namespace.py`` (array-api-compat has none for TensorFlow).
"""

from __future__ import annotations

import contextlib

import numpy as np
import tensorflow as tf

from ._base import Backend, Harness, python_fori, python_scan
from ._tensorflow_namespace import Namespace

try:  # no public API asks whether a tape watches a tensor
    from tensorflow.python.eager.record import should_record_backprop as _watched
except ImportError:  # pragma: no cover - a TensorFlow that moved it: stage nothing

    def _watched(tensors):
        return True


# Trips of a graph's tf.while_loop in flight at once: each holds a score chunk; two keep
# two cores busy for a fraction of the memory of TF's default of 10.
_PARALLEL_TRIPS = 2


def _leaves(tree):
    """The arrays of a (nested) structure, Nones left out."""
    return [a for a in tf.nest.flatten(tree) if a is not None]


def _rebuild(tree, leaves):
    """``tree`` with its array leaves replaced by ``leaves`` (Nones stay None)."""
    it = iter(leaves)
    flat = [None if a is None else next(it) for a in tf.nest.flatten(tree)]
    return tf.nest.pack_sequence_as(tree, flat)


def _while(body, loop_vars, trips):
    return tf.while_loop(
        lambda i, *_: i < trips[1],
        body,
        loop_vars,
        maximum_iterations=trips[0],
        parallel_iterations=_PARALLEL_TRIPS,
    )


@tf.custom_gradient
def _first_order_only(x):
    """Identity whose derivative raises: ``custom_vjp``'s residuals are computed off the
    tape, so a second derivative through them would be wrong."""

    def grad(_):
        raise NotImplementedError(
            "second derivatives through uniattn's backward='custom' are not supported on "
            "TensorFlow (its forward runs off the tape to keep memory O(n·d)); "
            "PyTorch and JAX support them"
        )

    return tf.identity(x), grad


class TensorFlowBackend(Backend):
    name = "tensorflow"
    has_autodiff = True
    compiles_per_shape = True  # `stage` traces a graph per input shape
    default_chunks = (512, 512)
    decode_key_chunk = 16384

    def is_array_type(self, tp):
        return issubclass(tp, (tf.Tensor, tf.Variable))

    def namespace(self):
        return Namespace

    def prepare(self, x):
        return tf.convert_to_tensor(x)  # reads a tf.Variable (the tape still sees it)

    def device_scope(self, x):
        # TF places an op on its default device, not its inputs'; keep the inputs'.
        return tf.device(x.device) if getattr(x, "device", "") else contextlib.nullcontext()

    def stage(self, fn):
        # A graph reuses buffers and overlaps two chunks; eager TF allocates every op's
        # output afresh. No XLA: TF keeps every compiled shape for the process's life.
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
        # Peel step 0 to learn the structure of y, then a tf.while_loop over TensorArrays
        # (whose gradients stack, like lax.scan's). None leaves stay outside.
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
            outs = [o.write(i, a) for o, a in zip(outs, _leaves(y_i), strict=True)]
            return i + 1, _leaves(c), outs

        loop_vars = (tf.constant(1), _leaves(carry), outs)
        _, carry_leaves, outs = _while(body, loop_vars, (length - 1, length))
        return _rebuild(carry, carry_leaves), _rebuild(y, [o.stack() for o in outs])

    def fori_loop(self, lower, upper, body, init, max_trips):
        if tf.executing_eagerly():
            return python_fori(lower, upper, body, init)

        def loop_body(i, leaves):
            return i + 1, _leaves(body(i, _rebuild(init, leaves)))

        lower = tf.convert_to_tensor(lower, tf.int32)
        _, leaves = _while(loop_body, (lower, _leaves(init)), (max_trips, upper))
        return _rebuild(init, leaves)

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

    def vjp(self, fn, *primals):
        primals = [tf.identity(p) for p in primals]
        with tf.GradientTape() as tape:
            for p in primals:
                tape.watch(p)
            out = fn(*primals)

        def vjp_fn(d_out):
            zero = tf.UnconnectedGradients.ZERO
            grads = tape.gradient(out, primals, output_gradients=d_out, unconnected_gradients=zero)
            return tuple(grads)

        return out, vjp_fn

    # -- performance hooks (docs/backends.md) ------------------------------------------
    def blocks(self, zeros):
        # A graph's loop copies a tensor it updates on every trip; a TensorArray swaps one
        # block per update. Eagerly, the default list does the same.
        if tf.executing_eagerly():
            return super().blocks(zeros)
        array = tf.TensorArray(zeros.dtype, size=zeros.shape[0], element_shape=zeros.shape[1:])
        return array.unstack(zeros)

    def add_block(self, blocks, index, update):
        if isinstance(blocks, list):
            return super().add_block(blocks, index, update)
        return blocks.write(index, blocks.read(index) + update)

    def stacked(self, blocks):
        return tf.stack(blocks) if isinstance(blocks, list) else blocks.stack()


def _is_float_tensor(x):
    return isinstance(x, (tf.Tensor, tf.Variable)) and x.dtype.is_floating


class TensorFlowHarness(Harness):
    def version(self):
        return tf.__version__

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

    def asarray(self, a, dtype=None):
        where = self.array_device
        with contextlib.nullcontext() if where is None else tf.device(where):
            t = tf.constant(np.array(a, copy=True))
            return t if dtype is None else tf.cast(t, getattr(tf, dtype))

    def to_numpy(self, x):
        if x.dtype.is_floating and x.dtype.size < 4:
            x = tf.cast(x, tf.float32)
        return np.array(x.numpy(), copy=True)

    def jit(self, fn):
        # No AutoGraph: uniattn's loops are tf.while_loop already, and AutoGraph's
        # conversion cache was seen to hand one test function's code to another.
        return tf.function(fn, jit_compile=True, reduce_retracing=False, autograph=False)

    def reset_peak_memory(self):
        # With oneDNN on, large tensors come from a pooling allocator whose pages stay
        # resident after a call (peak RSS would read 0); it keeps statistics.
        try:
            tf.config.experimental.reset_memory_stats("CPU:0")
            return tf.config.experimental.get_memory_info("CPU:0")["current"]
        except ValueError:  # "Allocator stats not available"
            return None

    def peak_memory(self):
        return tf.config.experimental.get_memory_info("CPU:0")["peak"]

    def softmax(self, s):
        return tf.nn.softmax(s)


backend = TensorFlowBackend()
harness = TensorFlowHarness(backend)
