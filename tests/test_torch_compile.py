"""torch.compile traces uniattn whole: no graph break, no warning about its caches.

The conformance suite checks compiled results on every backend; this checks how torch's
tracer gets through the dispatch and the caches (``uniattn._cache``) in front of the
algorithm, with ``fullgraph=True``, which raises on any graph break.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import uniattn

torch = pytest.importorskip("torch", reason="needs PyTorch")
# The documented recipe: importing the adapter beforehand spares the first compiled call
# an import, which torch's tracer cannot follow.
pytest.importorskip("uniattn.backends.torch")

CHUNKS = {"query_chunk_size": 16, "key_chunk_size": 16}  # a few chunks: a short trace


def _inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 40, 2, 8, generator=g, requires_grad=True) for _ in range(3))
    bias = torch.randn(2, 40, 40, generator=g, requires_grad=True)
    return q, k, v, bias


def _fullgraph(fn):
    """``fn`` traced by dynamo and AOTAutograd; "aot_eager" skips Inductor's code
    generation, which the conformance suite's compiled cases already run."""
    torch._dynamo.reset()  # a fresh trace, not one a previous test left cached
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


def _assert_same(compiled, eager):
    for c, e in zip(compiled, eager, strict=True):
        np.testing.assert_allclose(c.detach().numpy(), e.detach().numpy(), rtol=1e-5, atol=1e-6)


def _with_gradients(fn, inputs):
    """``fn``'s output and the gradients of its squared sum (the backward of a compiled
    ``fn`` is compiled with it, by AOTAutograd)."""
    out = fn(*inputs)
    return (out, *torch.autograd.grad(out.square().sum(), inputs))


@pytest.mark.parametrize("mode", ["custom", "autodiff"])
def test_attention_and_its_gradient_compile_to_one_graph(mode):
    def call(q, k, v, bias):
        return uniattn.attention(q, k, v, bias=bias, causal=True, backward=mode, **CHUNKS)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = _with_gradients(_fullgraph(call), _inputs())
    _assert_same(compiled, _with_gradients(call, _inputs()))
    cache_warnings = [str(w.message) for w in caught if "lru_cache" in str(w.message)]
    assert not cache_warnings, cache_warnings


def test_vjp_compiles_to_one_graph():
    def step(q, k, v, _):
        out, vjp_fn = uniattn.vjp(q, k, v, window=(8, 0), **CHUNKS)
        return (out, *vjp_fn(torch.ones_like(out)))

    _assert_same(_fullgraph(step)(*_inputs()), step(*_inputs()))
