"""``implementation``: each reason a call is not computed by the framework's fused kernel,
the default's fallback to the chunked algorithm, and that the fused path is the kernel
(torch's SDPA on the CPU, its fused kernels only). Results against the reference over the
case table are in conformance/test_fused.py."""

from __future__ import annotations

import re
import types

import numpy as np
import pytest

import uniattn
from uniattn import reference

torch = pytest.importorskip("torch")


def tensors(q_len=10, kv_len=10, heads=4, kv_heads=2, d_k=8, d_v=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, q_len, heads, d_k, generator=g, dtype=dtype)
    k = torch.randn(2, kv_len, kv_heads, d_k, generator=g, dtype=dtype)
    v = torch.randn(2, kv_len, kv_heads, d_v or d_k, generator=g, dtype=dtype)
    return q, k, v


def bool_mask(q_len=10, kv_len=10):
    return torch.rand(q_len, kv_len, generator=torch.Generator().manual_seed(1)) < 0.7


def refused(reason, *args, **kwargs):
    """Check that ``implementation="fused"`` raises a ValueError naming ``reason`` (a regex),
    and that the default computes the call with the chunked algorithm, bit for bit."""
    with pytest.raises(ValueError) as info:
        uniattn.attention(*args, implementation="fused", **kwargs)
    message = str(info.value)
    assert message.startswith("implementation='fused': "), message
    assert re.search(reason, message), f"{reason!r} not in {message!r}"
    default = uniattn.attention(*args, **kwargs)
    chunked = uniattn.attention(*args, implementation="chunked", **kwargs)
    for a, b in zip(
        *(x if isinstance(x, tuple) else (x,) for x in (default, chunked)), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_callable_bias_or_mask():
    refused("callable bias", *tensors(), bias=lambda i, j: (j - i).float())
    refused("callable mask", *tensors(), mask=lambda i, j: j <= i)


def test_bias_and_mask_together():
    refused("bias and a mask", *tensors(), bias=torch.zeros(10, 10), mask=bool_mask())


def test_window():
    refused("window", *tensors(), window=(3, 1))
    refused("window", *tensors(), window=(None, 2))


def test_rows_that_see_no_key():
    refused("first 6 query rows see no key", *tensors(q_len=16, kv_len=10), causal=True)


def test_causal_with_a_mask_or_bias():
    refused("causal with a mask", *tensors(), causal=True, mask=bool_mask())
    refused("causal with a bias", *tensors(), causal=True, bias=torch.zeros(10, 10))


def test_lengths():
    refused("query_lengths / key_lengths", *tensors(), key_lengths=torch.tensor([10, 3]))
    refused("query_lengths / key_lengths", *tensors(), query_lengths=torch.tensor([10, 10]))


def test_segment_ids():
    ids = torch.tensor([[0] * 5 + [1] * 5] * 2)
    refused("segment_ids", *tensors(), segment_ids=ids)


def test_sinks_softcap_dropout():
    refused("sinks", *tensors(), sinks=torch.zeros(4))
    refused("softcap", *tensors(), softcap=5.0)
    refused("dropout", *tensors(), dropout_rate=0.1, dropout_seed=3)


def test_autodiff_backward_and_lse():
    refused("backward='autodiff'", *tensors(), backward="autodiff")
    refused("return_lse", *tensors(), return_lse=True)


def test_zero_size():
    refused("zero-size", *tensors(q_len=0))
    refused("zero-size", *tensors(kv_len=0))


def test_torch_cpu_kernel_limits():
    refused("d_v 12 != d_k 8", *tensors(d_v=12))
    refused("bottom-right causal with q_len < kv_len", *tensors(q_len=6, kv_len=10), causal=True)
    bias = torch.zeros(10, 10, requires_grad=True)
    refused("bias gradient", *tensors(), bias=bias)
    with torch.no_grad():  # no gradient asked: eligible
        uniattn.attention(*tensors(), bias=bias, implementation="fused")
    with pytest.raises(ValueError, match="bias gradient"):  # vjp returns d_bias
        uniattn.vjp(*tensors(), bias=torch.zeros(10, 10), implementation="fused")


def test_old_torch(monkeypatch):
    monkeypatch.setattr(uniattn.backends.torch, "_VERSION", (2, 4))
    refused("from torch 2.5", *tensors())


def test_torch_cuda_refusals_before_the_kernels_are_asked():
    """On CUDA a bias or mask is refused (the efficient and cuDNN kernels' fully masked
    rows), and so is bottom-right causal with grouped heads; checked with stand-in arrays
    on a CUDA device."""
    from uniattn.backends.torch import _sdpa_refusal

    from uniattn import _fused
    from uniattn._api import _DEFAULTS
    from uniattn._arguments import parse

    def refusal(q, k, v, **kwargs):
        call = parse(q, k, v, {**_DEFAULTS, **kwargs})
        on_cuda = types.SimpleNamespace(type="cuda")
        arrays = call.arrays._replace(q=types.SimpleNamespace(device=on_cuda))
        return _sdpa_refusal(_fused.describe(call, vjp=False), arrays)

    assert "bias or mask on cuda" in refusal(*tensors(), mask=bool_mask())
    assert "bias or mask on cuda" in refusal(*tensors(heads=2), bias=torch.zeros(10, 10))
    assert "grouped key/value heads" in refusal(*tensors(q_len=4), causal=True)


def test_other_frameworks_name_their_missing_kernel():
    q, k, v = (x.numpy() for x in tensors())
    with pytest.raises(ValueError, match="implementation='fused': numpy has no fused"):
        uniattn.attention(q, k, v, implementation="fused")
    jnp = pytest.importorskip("jax.numpy")
    import jax

    if jax.devices()[0].platform == "gpu":
        pytest.skip("JAX's default device is a GPU here")
    with pytest.raises(ValueError, match="NVIDIA GPUs"):
        uniattn.attention(*(jnp.asarray(x) for x in (q, k, v)), implementation="fused")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_fused_calls_sdpa_without_its_math_path(monkeypatch, dtype):
    """The fused path is one call of SDPA, inside a context that leaves its math path out
    (the one that holds the n x n scores), and its result is the reference's."""
    import torch.nn.functional as F

    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(torch.backends.cuda.math_sdp_enabled())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    q, k, v = tensors(q_len=24, kv_len=24, dtype=dtype)
    out = uniattn.attention(q, k, v, causal=True)
    assert calls == [False]
    want = reference.attention(*(x.double().numpy() for x in (q, k, v)), causal=True)
    tol = {torch.bfloat16: 1.6e-2, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    assert np.abs(out.double().numpy() - want).max() <= tol * np.abs(want).max()
    uniattn.attention(q, k, v, causal=True, implementation="chunked")
    assert calls == [False]  # the chunked algorithm does not call it


def test_non_finite_inputs_take_the_chunked_algorithm():
    """A NaN key turns NaN exactly the rows that attend it (here, causally, rows 6..9),
    which the kernel would spread to every row of its block."""
    q, k, v = tensors()
    v[:, 6] = float("nan")
    out = uniattn.attention(q, k, v, causal=True, implementation="fused")
    nan_rows = torch.isnan(out).any(-1).any(-1)  # [batch, q_len]
    assert nan_rows[:, 6:].all() and not nan_rows[:, :6].any()


def test_gradients_through_the_kernel_match_the_chunked_ones():
    q, k, v = (x.requires_grad_() for x in tensors(q_len=12, kv_len=12))
    for implementation in ("fused", "chunked"):
        out, vjp_fn = uniattn.vjp(q, k, v, causal=True, implementation=implementation)
        d_out = torch.ones_like(out)
        grads = vjp_fn(d_out)
        autograd = torch.autograd.grad(
            uniattn.attention(q, k, v, causal=True, implementation=implementation),
            (q, k, v),
            d_out,
        )
        if implementation == "fused":
            fused = grads
        for a, b in zip(grads, autograd, strict=True):
            torch.testing.assert_close(a, b)
    for a, b in zip(fused, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_views_with_strided_last_axes_are_eligible():
    """The kernels read rows contiguously: views whose last axis is strided (a q, k, v
    sliced along the head dimension, a transposed mask) are copied for them, not refused."""
    q, k, v = (torch.cat([x, x], dim=-1)[..., ::2] for x in tensors())
    mask = bool_mask().T.contiguous().T
    for kwargs in ({}, {"mask": mask}):
        out = uniattn.attention(q, k, v, implementation="fused", **kwargs)
        want = uniattn.attention(q, k, v, implementation="chunked", **kwargs)
        torch.testing.assert_close(out, want)


def test_jax_kernel_on_the_users_layout_and_batch_axes(monkeypatch):
    """JAX's cuDNN path, checked on the CPU with XLA's implementation in cuDNN's place: the
    layouts, batch axes, grouped heads and top-left causal reach jax.nn as it expects, the
    output and uniattn.vjp's gradients are the chunked ones, and a non-finite input takes
    the chunked algorithm inside the same compiled function (lax.cond)."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    from uniattn.backends import jax as adapter

    dot_product_attention = jax.nn.dot_product_attention

    def on_xla(*args, implementation=None, **kwargs):
        assert implementation == "cudnn"
        return dot_product_attention(*args, **kwargs)

    monkeypatch.setattr(adapter, "_nvidia_gpu", lambda: True)
    monkeypatch.setattr(jax.nn, "dot_product_attention", on_xla)
    adapter._CUDNN_KERNELS.clear()  # kernels look jax.nn up when they run; none is cached
    g = np.random.default_rng(0)
    q = jnp.asarray(g.standard_normal((2, 3, 12, 4, 8)), jnp.bfloat16)  # two batch axes
    kv = jnp.asarray(g.standard_normal((2, 3, 16, 2, 8)), jnp.bfloat16)
    for layout in ("BTHD", "BHTD"):
        args = [q, kv, kv] if layout == "BTHD" else [jnp.swapaxes(x, -3, -2) for x in (q, kv, kv)]
        options = dict(causal="top_left", layout=layout)
        out = uniattn.attention(*args, implementation="fused", **options)
        want = uniattn.attention(*args, implementation="chunked", **options)
        np.testing.assert_allclose(np.float32(out), np.float32(want), atol=2e-2)
        d_out = jnp.ones_like(out)
        fused = uniattn.vjp(*args, implementation="fused", **options)[1](d_out)
        chunked = uniattn.vjp(*args, implementation="chunked", **options)[1](d_out)
        for a, b in zip(fused, chunked, strict=True):
            np.testing.assert_allclose(np.float32(a), np.float32(b), atol=5e-2)
    with pytest.raises(ValueError, match="takes float16 and bfloat16"):
        wide = kv.astype(jnp.float32)
        uniattn.attention(q.astype(jnp.float32), wide, wide, implementation="fused")
    bad = kv.at[:, :, 9].set(jnp.nan)  # key 9: causally seen by rows 9.. only
    out = uniattn.attention(q, bad, bad, causal="top_left", implementation="fused")
    nan_rows = np.isnan(np.float32(out)).any(axis=(-1, -2))
    assert nan_rows[..., 9:].all() and not nan_rows[..., :9].any()
