"""The attention implementations uniattn is measured against, per framework.

Each entry maps a name to ``fn(q, k, v)`` on ``[1, n, heads, d]`` arrays (uniattn's
default layout), or to a string saying why it is not available. Layout changes a peer
needs happen inside ``fn`` and are timed with it, as a user would pay them.
"""

from __future__ import annotations

import importlib.util
import os

import uniattn
from uniattn._plain import plain_attention


def implementations(backend) -> dict:
    """``{name: fn or reason}`` for ``backend``: uniattn, plain attention and the peers."""
    found = {
        "uniattn": uniattn.attention,
        "plain": lambda q, k, v: plain_attention(backend, q, k, v),
    }
    found.update(_NATIVE.get(backend.name, lambda: {})())
    found["keras"] = _keras(backend)
    if backend.name in ("jax", "torch"):
        found["memory-efficient-attention"] = _memory_efficient(backend.name)
    return found


def _torch():
    import torch.nn.functional as F

    def sdpa(q, k, v):
        out = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)))
        return out.transpose(1, 2)

    return {"torch sdpa": sdpa}


def _jax():
    import jax

    return {"jax.nn.dot_product_attention": jax.nn.dot_product_attention}


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
