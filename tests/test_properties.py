"""Property-based differential tests: uniattn against the float64 reference.

Hypothesis draws every argument together (batch axes of extent 0 to 2, lengths 0 to 20,
GQA, d_k != d_v, chunk sizes from 1 up, causal, windows, lengths, bias and mask in
random broadcast shapes, both layouts, strided and read-only arrays) and checks uniattn's NumPy float64 output and
``uniattn.vjp`` gradients against :mod:`uniattn.reference` within the dtype's tolerance,
the inputs unchanged. A failure prints the drawn arguments; rerun it with its seed.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import uniattn
from conformance.tolerances import assert_close, assert_gradients_close
from uniattn import reference


@st.composite
def calls(draw):
    """``(arrays, keywords)`` of one valid call, in float64."""
    batch = tuple(draw(st.lists(st.integers(0, 2), max_size=2)))
    q_len, kv_len = draw(st.integers(0, 20)), draw(st.integers(0, 20))
    kv_heads, groups = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    heads, d_k, d_v = kv_heads * groups, draw(st.integers(1, 6)), draw(st.integers(1, 6))
    layout = draw(st.sampled_from(["BTHD", "BHTD"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    def tensor(length, n_heads, d):
        shape = (length, n_heads, d) if layout == "BTHD" else (n_heads, length, d)
        x = rng.standard_normal((*batch, *shape[:-1], 2 * d)) * draw(st.sampled_from([0.5, 1, 4]))
        x = x[..., ::2] if draw(st.booleans()) else np.ascontiguousarray(x[..., :d])  # strided
        if draw(st.booleans()):
            x.setflags(write=False)  # read-only inputs work (nothing writes to them)
        return x

    arrays = {
        "query": tensor(q_len, heads, d_k),
        "key": tensor(kv_len, kv_heads, d_k),
        "value": tensor(kv_len, kv_heads, d_v),
    }
    full = (*batch, heads, q_len, kv_len)
    rank = len(full) - draw(st.integers(0, len(full)))  # leading axes may be left out

    def broadcast_shape():
        return tuple(n if draw(st.booleans()) else 1 for n in full[len(full) - rank :])

    kw = {"causal": draw(st.booleans())}
    if draw(st.booleans()):
        kw["bias"] = np.asarray(rng.standard_normal(broadcast_shape()))
    if draw(st.booleans()):
        kw["mask"] = np.asarray(rng.random(broadcast_shape()) < 0.8)
    if draw(st.booleans()):
        side = st.none() | st.integers(0, 6)
        kw["window"] = (draw(side), draw(side))
    if draw(st.booleans()):
        kw["query_lengths"] = rng.integers(-2, q_len + 3, size=batch)  # beyond: no padding
    if draw(st.booleans()):
        kw["key_lengths"] = rng.integers(-2, kv_len + 3, size=batch)
    if draw(st.booleans()):
        kw["scale"] = draw(st.floats(0.05, 2.0))
    kw["layout"] = layout
    chunks = {
        "query_chunk_size": draw(st.integers(1, 24)),
        "key_chunk_size": draw(st.integers(1, 24)),
    }
    return arrays, kw, chunks


@given(calls())
def test_forward_and_gradients_match_the_reference(call):
    arrays, kw, chunks = call
    before = {n: np.copy(x) for n, x in {**arrays, **kw}.items() if isinstance(x, np.ndarray)}
    out, lse = uniattn.attention(*arrays.values(), **kw, **chunks, return_lse=True)
    expected, expected_lse = reference.attention(*arrays.values(), **kw, return_lse=True)
    repro = f"kwargs={kw!r}, chunks={chunks!r}, shapes={[x.shape for x in arrays.values()]}"
    assert_close(out, expected, "float64", what="output", repro=repro)
    finite = np.isfinite(expected_lse)
    assert np.array_equal(np.isfinite(lse), finite), repro
    assert_close(lse[finite], expected_lse[finite], "float64", what="lse", repro=repro)

    d_out = np.random.default_rng(1).standard_normal(out.shape)
    _, vjp_fn = uniattn.vjp(*arrays.values(), **kw, **chunks)
    grads = vjp_fn(d_out)
    ref = reference.vjp(*arrays.values(), d_out, **kw)
    names = ["dq", "dk", "dv"] + (["d_bias"] if "bias" in kw else [])
    actual = dict(zip(names, grads, strict=False))
    assert_gradients_close(
        actual, {n: getattr(ref, n) for n in names}, "float64", what="vjp", repro=repro
    )

    for name, x in {**arrays, **kw}.items():
        if isinstance(x, np.ndarray):
            assert np.array_equal(x, before[name]), f"{name} was modified"


@given(calls(), st.integers(1, 24), st.integers(1, 24))
def test_chunk_sizes_do_not_change_the_result(call, q_chunk, k_chunk):
    arrays, kw, chunks = call
    a = uniattn.attention(*arrays.values(), **kw, **chunks)
    b = uniattn.attention(*arrays.values(), **kw, query_chunk_size=q_chunk, key_chunk_size=k_chunk)
    assert_close(
        a,
        b,
        "float64",
        what="output across chunk sizes",
        scale=max(np.max(np.abs(a), initial=0), 1e-300),
    )


@settings(max_examples=min(100, settings().max_examples))
@given(calls())
def test_torch_forward_and_autodiff_match_the_reference(call):
    """The same property through torch (float64) and its autograd with the custom backward."""
    torch = pytest.importorskip("torch", reason="torch is not installed")
    arrays, kw, chunks = call
    as_torch = {n: torch.from_numpy(x) if isinstance(x, np.ndarray) else x for n, x in kw.items()}
    primals = [torch.tensor(x).requires_grad_() for x in arrays.values()]  # (copies read-only ones)
    bias = as_torch.get("bias")
    if bias is not None:
        as_torch["bias"] = bias = bias.clone().requires_grad_()
    out = uniattn.attention(*primals, **as_torch, **chunks)
    repro = f"kwargs={kw!r}, chunks={chunks!r}, shapes={[x.shape for x in arrays.values()]}"
    assert_close(out.detach().numpy(), reference.attention(*arrays.values(), **kw), "float64",
                 what="torch output", repro=repro)  # fmt: skip
    d_out = np.random.default_rng(1).standard_normal(tuple(out.shape))
    wanted = primals + ([bias] if bias is not None else [])
    grads = torch.autograd.grad(out, wanted, torch.from_numpy(d_out), allow_unused=True)
    ref = reference.vjp(*arrays.values(), d_out, **kw)
    names = ["dq", "dk", "dv"] + (["d_bias"] if bias is not None else [])
    actual = {n: np.zeros_like(getattr(ref, n)) if g is None else g.numpy()
              for n, g in zip(names, grads, strict=True)}  # fmt: skip
    assert_gradients_close(actual, {n: getattr(ref, n) for n in names}, "float64",
                           what="torch autograd", repro=repro)  # fmt: skip
