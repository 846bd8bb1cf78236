"""The attention implementations uniattn is measured against, per framework.

Each entry maps a name to ``fn(q, k, v)`` on ``[1, n, heads, d]`` arrays (uniattn's
default layout), or to a string saying why it is not available. Layout changes a peer
needs happen inside ``fn`` and are timed with it, as a user would pay them. On a GPU the
fused kernels are measured each on its own as well: SDPA's FlashAttention-2, cuDNN and
memory-efficient kernels, and JAX's cuDNN attention.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import uniattn
from uniattn._plain import plain_attention


def implementations(backend, platform: str = "cpu", dtype: str = "float32") -> dict:
    """``{name: fn or reason}`` for ``backend``: uniattn, plain attention and the peers,
    for arrays of ``dtype`` on a device of kind ``platform`` (:meth:`Backend.platform`)."""
    found = {
        "uniattn": uniattn.attention,
        "plain": lambda q, k, v: plain_attention(backend, q, k, v),
    }
    found.update(_NATIVE.get(backend.name, lambda *_: {})(platform, dtype))
    found["keras"] = _keras(backend)
    if backend.name in ("jax", "torch"):
        found["memory-efficient-attention"] = _memory_efficient(backend.name)
    return found


_HALF_ONLY = "takes float16 and bfloat16 only"


def _torch(platform, dtype):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(q, k, v):
        out = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)))
        return out.transpose(1, 2)

    def pinned(kernel):
        def run(q, k, v):
            with sdpa_kernel(kernel):  # its backward is the same kernel's
                return sdpa(q, k, v)

        return run

    found = {"torch sdpa": sdpa}
    if platform == "cuda":
        kernels = {
            "flash": SDPBackend.FLASH_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION,
        }
        for label, kernel in kernels.items():
            half_only = label != "efficient" and dtype == "float32"
            found[f"torch sdpa {label}"] = _HALF_ONLY if half_only else pinned(kernel)
    return found


def _jax(platform, dtype):
    import jax

    found = {"jax.nn.dot_product_attention": jax.nn.dot_product_attention}
    if platform in ("gpu", "cuda"):
        cudnn = functools.partial(jax.nn.dot_product_attention, implementation="cudnn")
        found["jax.nn cudnn"] = _HALF_ONLY if dtype == "float32" else cudnn
    return found


_NATIVE = {"torch": _torch, "jax": _jax}


def _keras(backend):
    """keras.ops.dot_product_attention on the Keras backend of the same framework."""
    if importlib.util.find_spec("keras") is None:
        return "keras is not installed"
    wanted = {"jax": "jax", "torch": "torch", "tensorflow": "tensorflow", "numpy": "numpy"}
    if os.environ.get("KERAS_BACKEND") != wanted[backend.name]:
        return f"KERAS_BACKEND is not {wanted[backend.name]}"
    import keras

    return keras.ops.dot_product_attention


def _memory_efficient(framework: str):
    """The ``memory-efficient-attention`` package with its default 1024 x 4096 chunks."""
    if importlib.util.find_spec("memory_efficient_attention") is None:
        return "memory-efficient-attention is not installed"
    try:  # it imports both JAX and torch
        import memory_efficient_attention as mea
    except ImportError as e:
        return f"memory-efficient-attention does not import: {e}"

    fn = getattr(mea, "efficient_dot_product_attention_" + ("jax" if framework == "jax" else "pt"))
    return lambda q, k, v: fn(q, k, v)
