"""PyTorch adapter: a Python loop, ``torch.utils.checkpoint``, ``torch.autograd.Function``."""

from __future__ import annotations

import functools
import types

import array_api_compat.torch as compat
import numpy as np
import torch
import torch.utils.checkpoint

from ._base import LOG2_E, Backend, Harness, python_scan

# array-api-compat's torch namespace with torch's own matmul: uniattn multiplies operands
# of one dtype only, where compat's promotion checks are pure overhead in the inner loop.
xp = types.SimpleNamespace(
    **{name: getattr(compat, name) for name in dir(compat) if not name.startswith("__")}
)
xp.matmul = torch.matmul


_VERSION = tuple(int(x) for x in torch.__version__.split(".")[:2])
# torch.bmm(..., out_dtype=torch.float32): 16-bit operands into a float32 result with
# float32 accumulation, on CUDA from torch 2.8 (its CPU build has no such kernel).
_BMM_OUT_DTYPE = _VERSION >= (2, 8)
_HALF = (torch.float16, torch.bfloat16)


def _bmm_float32(a, b, bmm=torch.bmm):
    """``a @ b`` of 16-bit operands as float32, by ``bmm(.., out_dtype=torch.float32)``
    (3-D only), batch axes broadcast.

    A key or value chunk broadcast over its group of query heads (axis -3 of 1) is
    multiplied once, with the group folded into the rows, rather than copied per head.
    """
    if a.ndim >= 3 and b.ndim == a.ndim and b.shape[-3] == 1 and a.shape[-3] != 1:
        groups, rows = a.shape[-3], a.shape[-2]
        folded = a.reshape(*a.shape[:-3], groups * rows, a.shape[-1])
        out = _bmm_float32(folded, b.squeeze(-3), bmm)
        return out.reshape(*a.shape[:-3], groups, rows, out.shape[-1])
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    flat_a = a.expand(*batch, *a.shape[-2:]).reshape(-1, *a.shape[-2:])
    flat_b = b.expand(*batch, *b.shape[-2:]).reshape(-1, *b.shape[-2:])
    out = bmm(flat_a, flat_b, out_dtype=torch.float32)
    return out.reshape(*batch, *out.shape[-2:])


def _needs_grad(args):
    return torch.is_grad_enabled() and any(
        isinstance(a, torch.Tensor) and a.requires_grad for a in args
    )


class _CustomVJP(torch.autograd.Function):
    """``Backend.custom_vjp``: ``apply(fwd, bwd, *args)``."""

    @staticmethod
    def forward(ctx, fwd, bwd, *args):
        out, residuals = fwd(*args)
        # Tensors go through save_for_backward: keeping them on ctx itself would make a
        # reference cycle (output -> grad_fn -> ctx -> output).
        leaves, ctx.structure = torch.utils._pytree.tree_flatten(residuals)
        ctx.bwd = bwd
        ctx.is_tensor = [isinstance(x, torch.Tensor) for x in leaves]
        ctx.others = [None if t else x for x, t in zip(leaves, ctx.is_tensor, strict=True)]
        ctx.save_for_backward(*(x for x, t in zip(leaves, ctx.is_tensor, strict=True) if t))
        return out

    @staticmethod
    def backward(ctx, *d_out):
        tensors = iter(ctx.saved_tensors)
        leaves = [next(tensors) if t else x for x, t in zip(ctx.others, ctx.is_tensor, strict=True)]
        residuals = torch.utils._pytree.tree_unflatten(leaves, ctx.structure)
        grads = ctx.bwd(residuals, d_out[0] if len(d_out) == 1 else d_out)
        return (None, None, *grads)


class TorchBackend(Backend):
    name = "torch"
    has_autodiff = True
    # Each chunk pair costs the Python loop a dozen kernel launches: on the H100 (`tune`,
    # n 8192) 2048 x 4096 chunks ran 24% faster than 1024 x 4096, for a float32 score block
    # of 32 MiB per head. JAX's compiled loop gains 5% there, and keeps the paper's chunks.
    accelerator_chunks = (2048, 4096)

    def is_array_type(self, tp):
        return issubclass(tp, torch.Tensor)

    def namespace(self):
        return xp

    def dtype_name(self, x):
        return str(x.dtype).removeprefix("torch.")

    def device(self, x):
        return x.device

    def is_accelerator(self, device):
        return device.type != "cpu"

    def scan(self, step, init, xs, length):
        # unbind once: its backward stacks the chunk gradients in one go, where indexing
        # each step would scatter into a fresh zero tensor per chunk.
        return python_scan(step, init, [x.unbind(0) for x in xs], length, torch.stack)

    def remat(self, fn):
        def rematerialised(*args):
            if not _needs_grad(args):
                return fn(*args)
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)

        return rematerialised

    def stop_gradient(self, x):
        return x.detach()

    def cond(self, pred, fast, safe, operands):
        if torch.compiler.is_compiling():  # no graph break on a value: always safe
            return safe(*operands)
        return fast(*operands) if bool(pred) else safe(*operands)

    def concrete_ints(self, x):
        return None if torch.compiler.is_compiling() else x.tolist()

    def custom_vjp(self, fwd, bwd):
        # One Function class for every call, with fwd and bwd passed to it: torch.compile
        # cannot trace a class defined while it traces (a graph break).
        return functools.partial(_CustomVJP.apply, fwd, bwd)

    def vjp(self, fn, *primals):
        primals = [p.detach().requires_grad_(p.is_floating_point()) for p in primals]
        out = fn(*primals)

        def vjp_fn(d_out):
            wanted = [p for p in primals if p.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, d_out, allow_unused=True))
            return tuple(next(grads) if p.requires_grad else None for p in primals)

        return out, vjp_fn

    def ring(self, axis_name, group):
        from ._torch_ring import TorchRing

        return TorchRing(axis_name, group)

    def fused(self, call, arrays):
        reason = _sdpa_refusal(call, arrays)
        return reason if reason is not None else _sdpa(call)

    def multiplies_16bit(self, device):
        return device.type == "cuda" and _BMM_OUT_DTYPE

    def matmul(self, a, b, *, transposed=False):
        if transposed:
            b = b.transpose(-1, -2)
        if a.dtype in _HALF:
            # Autograd through the out_dtype product is not relied on: backward="autodiff"
            # (operands that need a gradient) multiplies lifted operands.
            if a.is_cuda and _BMM_OUT_DTYPE and not _needs_grad((a, b)):
                return _bmm_float32(a, b)
            a, b = a.float(), b.float()
        return torch.matmul(a, b)

    def cond_call(self, pred, fn, sanitize, operands, passed=(), reuse=1):
        # Around fn, so that the branch that knows its operands are finite says so
        # (Backend.masked may then clamp).
        return self.cond(
            pred,
            lambda *ops: fn(*ops, *passed, finite=True),
            lambda *ops: fn(*sanitize(*ops), *passed),
            operands,
        )

    def masked(self, s, allowed, nan_free=False):
        if s.requires_grad:  # autograd may need s: out of place
            return torch.where(allowed, s, float("-inf"))
        if nan_free:
            # min(s, inf) = s and min(s, -inf) = -inf, in place: on the CPU a fifth of the
            # time of masked_fill_ (a [4, 256, 512] block: 0.09 against 0.50 ms), whose
            # kernel branches per entry.
            inf = s.new_tensor(float("inf"))
            return s.clamp_(max=torch.where(allowed, inf, -inf))
        return s.masked_fill_(allowed.logical_not(), float("-inf"))

    def keep_mask(self, hashed, least):
        # 1 where hashed >= least, else 0, in place: on the CPU a product by these 0/1
        # integers costs half as much as where() or masked_fill_ over a bool mask, which
        # branch per entry (0.7 against 1.5 ms per [4, 256, 512] block, hash included).
        return hashed.clamp_(least - 1, least).sub_(least - 1)

    def dropped(self, x, keep, scale):
        if x.requires_grad:  # autograd may need x: out of place
            return torch.where(keep.bool(), x * scale, 0.0)
        return x.mul_(keep).mul_(scale)

    def exp_shifted(self, s, shift):
        if s.requires_grad:  # autograd may need s: out of place
            return torch.exp(s - shift)
        # In place, and as exp2, about half the time of exp on the CPU.
        return s.sub_(shift).mul_(LOG2_E).exp2_()


# SDPA's fused kernels: FlashAttention-2 and the memory-efficient and cuDNN kernels on CUDA,
# the flash kernel on the CPU; never the math path, which holds the n x n scores.
def _fused_kernels():
    from torch.nn.attention import SDPBackend

    return [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


def _sdpa_refusal(call, arrays):
    """Why torch's fused SDPA kernels do not compute ``call`` exactly, or None."""
    device = arrays.q.device
    if device.type not in ("cpu", "cuda"):
        return f"torch on {device.type}: uniattn calls SDPA's fused kernels on cpu and cuda"
    if _VERSION < (2, 5):
        return f"torch {torch.__version__}: uniattn calls SDPA's fused kernels from torch 2.5"
    if call.reason is not None:
        return call.reason
    bias = arrays.bias
    bias_gradient = bias is not None and (
        call.vjp or (torch.is_grad_enabled() and bias.requires_grad)
    )
    if device.type == "cpu":
        if call.d_k != call.d_v:
            return f"d_v {call.d_v} != d_k {call.d_k}: torch's CPU flash kernel takes one head size"
        if bias_gradient:
            return "a bias gradient: torch's CPU flash kernel computes none"
        if call.causal == "bottom_right":
            return (
                "bottom-right causal with q_len < kv_len: torch's CPU flash kernel is causal "
                "from the top left only (torch would build a q_len x kv_len mask)"
            )
        return None
    if call.bias or call.mask:
        return (
            "a bias or mask on cuda: SDPA's efficient and cuDNN kernels give NaN or the mean "
            "of the values on a row the mask switches off entirely, where uniattn gives 0"
        )
    gqa = call.heads != call.kv_heads
    if call.causal == "bottom_right" and gqa:
        return (
            "bottom-right causal with grouped key/value heads: torch's causal_lower_right "
            "calls the kernels without enable_gqa"
        )
    q, k, v = (_bhtd(x, call.layout) for x in (arrays.q, arrays.k, arrays.v))
    params = torch.backends.cuda.SDPAParams(
        q, k, v, None, 0.0, call.causal == "top_left", gqa and call.causal != "bottom_right"
    )
    usable = [
        torch.backends.cuda.can_use_flash_attention,
        torch.backends.cuda.can_use_efficient_attention,
    ]
    if call.causal != "bottom_right":  # causal_lower_right goes to flash or efficient only
        usable.append(torch.backends.cuda.can_use_cudnn_attention)
    if not any(can_use(params) for can_use in usable):
        return (
            f"no fused SDPA kernel on {device} takes {call.dtype} with d_k {call.d_k}, d_v "
            f"{call.d_v}{' and grouped heads' if gqa else ''} (torch warns why with "
            "torch.backends.cuda.can_use_*_attention(params, debug=True))"
        )
    return None


def _bhtd(x, layout):
    """``x`` as SDPA takes it: ``[batch, heads, length, dim]`` (views where they can be)."""
    if layout == "BTHD":
        x = x.transpose(-3, -2)
    x = x.reshape(-1, *x.shape[-3:])
    return x if x.stride(-1) == 1 else x.contiguous()  # the kernels read rows contiguously


def _flat_batch(x, batch):
    """A bias or mask broadcastable to ``[*batch, heads, q_len, kv_len]`` as a 4-D one
    broadcastable to ``[prod(batch), heads, q_len, kv_len]`` (SDPA's CPU flash kernel takes
    2-D and 4-D masks only)."""
    x = x.reshape((1,) * (len(batch) + 3 - x.ndim) + tuple(x.shape))
    outer, inner = tuple(x.shape[: len(batch)]), tuple(x.shape[len(batch) :])
    if all(n == 1 for n in outer):
        return x.reshape(1, *inner)
    return x.expand(*batch, *inner).reshape(-1, *inner)


_SDPA_KERNELS: dict = {}


def _sdpa(call):
    """The kernel of ``call``: SDPA restricted to its fused kernels."""
    key = (call.layout, call.scale, call.causal, call.heads != call.kv_heads)
    if key in _SDPA_KERNELS:
        return _SDPA_KERNELS[key]
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    layout, scale, causal, gqa = key
    kernels = _fused_kernels()

    def kernel(q, k, v, bias, mask):
        batch = tuple(q.shape[:-3])
        q, k, v = (_bhtd(x, layout) for x in (q, k, v))
        if bias is not None:
            # In the accumulation dtype, as uniattn adds it. No gradient is asked of it (see
            # _sdpa_refusal); the CPU kernel refuses a mask that requires one even then.
            wide = torch.float64 if q.dtype == torch.float64 else torch.float32
            bias = bias.detach().to(wide)
        attn_mask = bias if bias is not None else mask
        if attn_mask is not None:
            attn_mask = _flat_batch(attn_mask, batch)
            if attn_mask.stride(-1) not in (0, 1):
                attn_mask = attn_mask.contiguous()
        if causal == "bottom_right":
            attn_mask = causal_lower_right(q.shape[-2], k.shape[-2])
        with sdpa_kernel(kernels):
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attn_mask,
                is_causal=causal == "top_left",
                scale=scale,
                enable_gqa=gqa,
            )
        out = out.reshape(*batch, *out.shape[-3:])
        return out.transpose(-3, -2) if layout == "BTHD" else out

    _SDPA_KERNELS[key] = kernel
    return kernel


class TorchHarness(Harness):
    def version(self):
        return torch.__version__

    def find_device(self, name):
        try:
            device = torch.device(name)
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as e:  # unknown kind; not compiled in
            raise ValueError(f"device: torch has no device {name!r} here ({e})") from None
        return device

    def platform(self, x):
        return x.device.type

    def asarray(self, a, dtype=None):
        t = torch.from_numpy(np.array(a, copy=True))
        return t.to(self.array_device, None if dtype is None else getattr(torch, dtype))

    def to_numpy(self, x):
        x = x.detach()
        if x.is_floating_point() and x.element_size() < 4:
            x = x.float()
        return x.cpu().numpy().copy()

    def jit(self, fn):
        return torch.compile(fn, fullgraph=False, dynamic=False)

    def block(self, x):
        if torch.cuda.is_initialized():  # kernels run asynchronously
            torch.cuda.synchronize()
        return x

    def reset_peak_memory(self):
        # CUDA's caching allocator keeps exact statistics; torch's CPU allocator keeps none.
        if not torch.cuda.is_initialized():
            return None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()

    def peak_memory(self):
        return torch.cuda.max_memory_allocated()

    def softmax(self, s):
        return torch.softmax(s, dim=-1)


backend = TorchBackend()
harness = TorchHarness(backend)
