"""JAX adapter: ``lax.scan``, ``jax.checkpoint``, ``jax.custom_vjp``."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ._base import Backend, Harness

# Query rows per key from which a call sanitizes its operands unconditionally (cond_call).
_SANITIZE_FROM_REUSE = 64


class JaxBackend(Backend):
    name = "jax"
    has_autodiff = True
    compiles_per_shape = True
    decode_key_chunk = 65536  # each key chunk costs XLA a copy of its keys and values

    def is_array_type(self, tp):
        # jax.Array admits tracers through isinstance only; the dispatch cache works on types.
        return issubclass(tp, (jax.Array, jax.core.Tracer))

    def namespace(self):
        return jnp  # jax.numpy implements the array API standard itself

    def is_accelerator(self, device):
        # Traced arrays carry no device: jit runs on the default backend's.
        return jax.default_backend() != "cpu"

    def stage(self, fn):
        # Eager lax.scan re-traces and compiles on every call; jit caches per shape.
        return jax.jit(fn)

    def scan(self, step, init, xs, length):
        # Scanned chunks travel flat, as in `chunks`; so do the stacked results.
        flat_xs = [_Flat(x) for x in xs]
        structure = []

        def body(carry, x):
            index, *parts = x
            chunks = [f.unflatten(p) for f, p in zip(flat_xs, parts, strict=True)]
            carry, ys = step(carry, index, chunks)
            leaves, tree = jax.tree.flatten(ys)
            structure[:] = [tree, [y.shape for y in leaves]]
            return carry, [y.reshape(-1) for y in leaves]

        index = jnp.arange(length, dtype=jnp.int32)
        carry, ys = jax.lax.scan(body, init, (index, *(f.flat for f in flat_xs)), length=length)
        tree, shapes = structure
        stacked = [y.reshape(length, *s) for y, s in zip(ys, shapes, strict=True)]
        return carry, jax.tree.unflatten(tree, stacked)

    def fori_loop(self, lower, upper, body, init, max_trips):
        if isinstance(lower, int) and isinstance(upper, int):
            return jax.lax.fori_loop(lower, upper, body, init)  # a scan: differentiable

        # Dynamic bounds: a while loop would not be reverse-differentiable, so scan over
        # the static bound and skip the trips past ``upper`` with a (real) branch.
        def step(carry, trip):
            i = lower + trip
            return jax.lax.cond(i < upper, body, lambda _, c: c, i, carry), None

        return jax.lax.scan(step, init, jnp.arange(max_trips, dtype=jnp.int32))[0]

    def remat(self, fn):
        # prevent_cse=False is safe (and faster) inside scan, where every call lives.
        return jax.checkpoint(fn, prevent_cse=False)

    def stop_gradient(self, x):
        return jax.lax.stop_gradient(x)

    def cond(self, pred, fast, safe, operands):
        # Operands travel flat, behind a barrier: XLA would otherwise move their reshapes
        # into the branches and copy each operand into every branch.
        flat = jax.lax.optimization_barrier(jax.tree.map(lambda x: x.reshape(-1), operands))

        def unflattened(branch):
            def run(*parts):
                return branch(*jax.tree.map(lambda p, x: p.reshape(x.shape), parts, operands))

            return run

        return jax.lax.cond(pred, unflattened(fast), unflattened(safe), *flat)

    def custom_vjp(self, fwd, bwd):
        f = jax.custom_vjp(lambda *args: fwd(*args)[0])
        f.defvjp(fwd, lambda res, g: tuple(bwd(res, g)))
        # Inside jax.shard_map an argument replicated over a manual axis (sinks, a bias)
        # while the others vary gets a varying cotangent, and a custom rule must return
        # its primal's type: make every argument varying over the same axes first, as
        # JAX's own operations do implicitly (its transpose sums the cotangent).
        return lambda *args: f(*_varying_alike(args))

    def vjp(self, fn, *primals):
        return jax.vjp(fn, *primals)

    # -- performance hooks (docs/backends.md) ------------------------------------------
    def fused(self, call, arrays):
        if not _nvidia_gpu():
            return (
                "JAX's fused attention (jax.nn.dot_product_attention with cuDNN) runs on "
                f"NVIDIA GPUs; JAX's default backend here is {jax.default_backend()}"
            )
        if call.reason is not None:
            return call.reason
        if call.dtype not in ("float16", "bfloat16"):
            return f"dtype {call.dtype}: cuDNN's attention takes float16 and bfloat16"
        if call.bias or call.mask:
            return (
                "a bias or mask: cuDNN's attention is not known to give 0 on a row the mask "
                "switches off entirely, as uniattn does"
            )
        if call.causal == "bottom_right":
            return "bottom-right causal with q_len < kv_len: jax.nn's causal mask is top-left"
        if call.d_k != call.d_v:
            return f"d_v {call.d_v} != d_k {call.d_k}: jax.nn.dot_product_attention takes one"
        if call.d_k % 8 or call.d_k > 128:
            return f"d_k {call.d_k}: cuDNN's attention takes multiples of 8 up to 128"
        return _cudnn(call.layout, call.scale, call.causal == "top_left")

    def multiplies_16bit(self, device):
        # GPUs and TPUs multiply 16-bit operands into float32 natively. XLA:CPU does not
        # execute every such dot: its DotThunk is UNIMPLEMENTED for BF16 x BF16 = F32 with a
        # transposed lhs and three batch axes (the backward's dKᵀ = Qᵀ dS with grouped heads,
        # batch 2), though where it ran, bfloat16 at n 2048 took 41-55 ms forward against
        # 55-61 lifted.
        return jax.default_backend() != "cpu"

    def matmul(self, a, b, *, transposed=False):
        # 16-bit operands multiply as they are into float32 (tensor cores on GPUs),
        # rather than lifted first.
        wide = jnp.float32 if a.dtype in (jnp.bfloat16, jnp.float16) else None
        if not transposed:
            return jnp.matmul(a, b, preferred_element_type=wide)
        # Contract both last axes, with the batch axes flattened to one: XLA would copy a
        # transposed b, and lay out the unit axes of the canonical layout permuted, then
        # copy every score block.
        if a.shape[:-2] != b.shape[:-2]:
            return jnp.einsum("...qd,...kd->...qk", a, b, preferred_element_type=wide)
        flat = [x.reshape(math.prod(x.shape[:-2]), *x.shape[-2:]) for x in (a, b)]
        product = jnp.einsum("bqd,bkd->bqk", *flat, preferred_element_type=wide)
        return product.reshape(*a.shape[:-1], b.shape[-2])

    def chunks(self, stacked):
        return _Flat(stacked)

    def blocks(self, zeros):
        return zeros  # one array, updated in place by XLA

    def add_block(self, blocks, index, update):
        part = jax.lax.dynamic_index_in_dim(blocks, index, keepdims=False) + update
        return jax.lax.dynamic_update_index_in_dim(blocks, part, index, 0)

    def stacked(self, blocks):
        return blocks

    def ring(self, axis_name, group):
        from ._jax_ring import JaxRing

        return JaxRing(axis_name, group)

    def cond_call(self, pred, fn, sanitize, operands, passed=(), reuse=1):
        if reuse >= _SANITIZE_FROM_REUSE:
            # XLA fuses the elementwise sanitizing into the copies that lay the operands
            # out in chunks, where a conditional would first materialise them flat and
            # compile fn twice: n 8192 forward 35-42 -> 18-25 ms of fixed cost,
            # temporaries 53 -> 29 MiB. A decoding step keeps the branch: a pass over its cache
            # costs as much as its attention.
            return fn(*sanitize(*operands), *passed)
        # Around fn: branching on the operands alone would return them as new buffers
        # (a decoding step's whole cache). `passed` go in as operands too: XLA copies
        # what a branch closes over.
        n = len(operands)

        def safe(*args):
            return fn(*sanitize(*args[:n]), *args[n:])

        return self.cond(pred, fn, safe, (*operands, *passed))


def _varying_alike(args):
    """``args`` each varying over every manual mesh axis that any of them varies over."""
    vmas = [_varying_axes(a) for a in args]
    axes = frozenset().union(*vmas)
    if not axes:
        return args
    return tuple(
        a if vma == axes else _pcast_varying(a, tuple(axes - vma))
        for a, vma in zip(args, vmas, strict=True)
    )


def _varying_axes(a) -> frozenset:
    """The manual mesh axes ``a`` varies over (empty outside ``jax.shard_map``)."""
    if a is None or not hasattr(jax, "typeof"):  # older JAX: no typeof, no manual axis types
        return frozenset()
    aval = jax.typeof(a)
    manual = getattr(aval, "manual_axis_type", None)  # JAX 0.10; 0.6 to 0.9 call it vma
    return manual.varying if manual is not None else getattr(aval, "vma", frozenset())


def _pcast_varying(a, axes):
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(a, axes, to="varying")
    return jax.lax.pvary(a, axes)


def _nvidia_gpu() -> bool:
    """Whether JAX's default device is an NVIDIA GPU (cuDNN's)."""
    device = jax.devices()[0]
    return device.platform == "gpu" and "nvidia" in device.device_kind.lower()


_CUDNN_KERNELS: dict = {}


def _cudnn(layout, scale, causal):
    """``jax.nn.dot_product_attention`` with cuDNN, on the user's layout and batch axes."""
    key = (layout, scale, causal)
    if key not in _CUDNN_KERNELS:

        def kernel(q, k, v, bias, mask):
            if layout == "BHTD":  # jax.nn takes [batch, length, heads, dim]
                q, k, v = (jnp.swapaxes(x, -3, -2) for x in (q, k, v))
            batch = q.shape[:-3]
            q, k, v = (x.reshape(-1, *x.shape[-3:]) for x in (q, k, v))
            out = jax.nn.dot_product_attention(
                q, k, v, scale=scale, is_causal=causal, implementation="cudnn"
            )
            out = out.reshape(*batch, *out.shape[-3:])
            return jnp.swapaxes(out, -3, -2) if layout == "BHTD" else out

        _CUDNN_KERNELS[key] = kernel
    return _CUDNN_KERNELS[key]


@jax.tree_util.register_pytree_node_class
class _Flat:
    """Stacked chunks ``[count, *shape]`` held as ``[count, prod(shape)]``: XLA lays out a
    stacked operand's unit axes as it likes, then copies it into a loop that wants another
    layout; a flat operand has one layout."""

    def __init__(self, stacked):
        self.shape = stacked.shape[1:]
        self.flat = stacked.reshape(stacked.shape[0], -1)

    def tree_flatten(self):
        return (self.flat,), self.shape

    @classmethod
    def tree_unflatten(cls, shape, children):
        flat = object.__new__(cls)
        flat.shape, flat.flat = shape, children[0]
        return flat

    def unflatten(self, part):
        return part.reshape(self.shape)

    def __getitem__(self, index):
        return self.unflatten(self.flat[index])


class JaxHarness(Harness):
    def version(self):
        return jax.__version__

    def find_device(self, name):
        platform, _, index = name.lower().partition(":")
        try:
            return jax.devices(platform)[int(index or 0)]
        except (RuntimeError, ValueError, IndexError) as e:
            raise ValueError(f"device: JAX has no device {name!r} here ({e})") from None

    def platform(self, x):
        return next(iter(x.devices())).platform

    def asarray(self, a, dtype=None):
        return jnp.asarray(a, dtype=dtype, device=self.array_device)

    def to_numpy(self, x):
        if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize < 4:
            x = x.astype(jnp.float32)
        return np.array(x, copy=True)

    def jit(self, fn):
        return jax.jit(fn)

    def precompile(self, fn, *args):
        return jax.jit(fn).lower(*args).compile()

    def block(self, x):
        return jax.block_until_ready(x)

    def softmax(self, s):
        return jax.nn.softmax(s, axis=-1)


backend = JaxBackend()
harness = JaxHarness(backend)
