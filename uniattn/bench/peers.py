"""The attention implementations uniattn is measured against, per framework.

Each entry maps a name to ``fn(q, k, v)`` on ``[1, n, heads, d]`` arrays (uniattn's
default layout; ``[1, heads, n, d]`` for layout BHTD), or to a string saying why it is not
available. Layout changes a peer
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


def implementations(
    backend, platform: str = "cpu", dtype: str = "float32", causal: bool = False, layout="BTHD"
) -> dict:
    """``{name: fn or reason}`` for ``backend``: uniattn, plain attention and the peers,
    for arrays of ``dtype`` in ``layout`` on a device of kind ``platform``
    (:meth:`Backend.platform`), causal or not.

    "uniattn" is the default implementation, which is a framework's fused kernel where one
    computes the call (``implementation``); "uniattn chunked", listed where the two differ,
    is uniattn's algorithm."""
    options = dict(causal=causal, layout=layout)
    found = {"uniattn": functools.partial(uniattn.attention, **options)}
    if _fused_applies(backend, **options):
        found["uniattn chunked"] = functools.partial(
            uniattn.attention, implementation="chunked", **options
        )
    plain = layout == "BTHD" and not causal
    found["plain"] = (
        (lambda q, k, v: plain_attention(backend, q, k, v)) if plain else _DEFAULT_OPTIONS_ONLY
    )
    found.update(_NATIVE.get(backend.name, lambda *_: {})(platform, dtype, causal, layout))
    found["keras"] = _keras(backend) if plain else _DEFAULT_OPTIONS_ONLY
    if backend.name in ("jax", "torch"):
        mea = _memory_efficient(backend.name)
        found["memory-efficient-attention"] = mea if plain else _DEFAULT_OPTIONS_ONLY
    return found


_HALF_ONLY = "takes float16 and bfloat16 only"
_DEFAULT_OPTIONS_ONLY = "measured in layout BTHD without causal only"


def _fused_applies(backend, causal, layout) -> bool:
    """Whether the default implementation takes the framework's fused kernel for this
    benchmark's calls (on a small call of the same options)."""
    import numpy as np

    x = backend.asarray(np.zeros((1, 8, 2, 8)), "float32")
    try:
        uniattn.attention(x, x, x, implementation="fused", causal=causal, layout=layout)
    except ValueError:
        return False
    return True


def _torch(platform, dtype, causal, layout):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(q, k, v):
        if layout == "BHTD":
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        out = F.scaled_dot_product_attention(
            *(x.transpose(1, 2) for x in (q, k, v)), is_causal=causal
        )
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


def _jax(platform, dtype, causal, layout):
    import jax
    import jax.numpy as jnp

    def jax_nn(implementation=None):
        def run(q, k, v):
            if layout == "BHTD":  # jax.nn takes [batch, length, heads, dim]
                q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
            out = jax.nn.dot_product_attention(
                q, k, v, is_causal=causal, implementation=implementation
            )
            return jnp.swapaxes(out, 1, 2) if layout == "BHTD" else out

        return run

    found = {"jax.nn.dot_product_attention": jax_nn()}
    if platform in ("gpu", "cuda"):
        found["jax.nn cudnn"] = _HALF_ONLY if dtype == "float32" else jax_nn("cudnn")
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
