"""Property-based differential tests: every backend against the float64 reference.

Hypothesis draws whole calls: 0 to 2 batch axes of extent 0 to 2, lengths 0 to 20, GQA,
d_k != d_v, chunk sizes from 1 up, causal, windows, query/key lengths (also out of range),
bias and mask arrays in random broadcast shapes or callables, scale, both layouts, every
dtype of the backend, both backward modes, and strided or read-only NumPy inputs. Each
example checks output, lse and gradients against :mod:`uniattn.reference` (evaluated on
the inputs rounded to the dtype) within the dtype's tolerance, and that no input changed.

Budgets: the hypothesis profile's ``max_examples`` (``ci``: 400, seeded; ``long``: 3000)
on NumPy, scaled down where each example compiles (:data:`SHARE`). A failure prints the
drawn call; every bug found this way has a case in ``cases.py``.
"""

from __future__ import annotations

import array_api_compat.numpy
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import uniattn
from uniattn import reference

from .cases import CALLABLES
from .tolerances import assert_close, assert_gradients_close

#: Each backend's share of the profile's examples: torch runs eagerly; JAX and TensorFlow
#: compile a new program for every drawn shape (seconds each on a CPU).
SHARE = {"numpy": 1.0, "torch": 0.25, "jax": 0.02, "tensorflow": 0.02}


@st.composite
def calls(draw, backend):
    """One valid call: float64 NumPy ``arrays`` and ``keywords``, ``chunks``, the dtype, the
    backward mode and the names of callables standing in for bias or mask."""
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

    kw, fns = {"causal": draw(st.booleans())}, {}
    for name in ("bias", "mask"):
        kind = draw(st.sampled_from(["none", "array", "callable"]))
        if kind == "array" and name == "bias":
            kw["bias"] = np.asarray(rng.standard_normal(broadcast_shape()))
        elif kind == "array":
            kw["mask"] = np.asarray(rng.random(broadcast_shape()) < 0.8)
        elif kind == "callable":
            fns[name] = draw(
                st.sampled_from(["alibi"] if name == "bias" else ["documents", "near-keys"])
            )
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
    dtype = draw(st.sampled_from(backend.dtypes))
    modes = ["custom", "autodiff"] if backend.has_autodiff else ["custom"]
    return arrays, kw, chunks, dtype, draw(st.sampled_from(modes)), fns


def _budget(backend) -> int:
    return max(5, round(settings().max_examples * SHARE.get(backend.name, 0.02)))


def test_forward_and_gradients_match_the_reference(backend):
    @settings(max_examples=_budget(backend))
    @given(calls(backend))
    def check(call):
        arrays, kw, chunks, dtype, mode, fns = call
        repro = (
            f"{backend.name}, {dtype}, backward={mode!r}, callables={fns}, kwargs={kw!r}, "
            f"chunks={chunks!r}, shapes={[x.shape for x in arrays.values()]}"
        )
        before = {n: np.copy(x) for n, x in {**arrays, **kw}.items() if isinstance(x, np.ndarray)}
        mine = {n: backend.asarray(x, dtype) for n, x in arrays.items()}
        mine_kw = {n: _convert(backend, n, x, dtype) for n, x in kw.items()}
        # The reference sees exactly the values under test (rounded to the dtype).
        rounded = {n: backend.to_numpy(x).astype(np.float64) for n, x in mine.items()}
        ref_kw = dict(kw)
        if "bias" in kw:
            ref_kw["bias"] = backend.to_numpy(mine_kw["bias"]).astype(np.float64)
        heads = arrays["query"].shape[-2 if kw["layout"] == "BTHD" else -3]
        acc = "float64" if dtype == "float64" else "float32"
        for name, fn in fns.items():
            xp = backend.namespace()
            mine_kw[name] = CALLABLES[fn](xp, heads, getattr(xp, acc), backend.array_device)
            ref_kw[name] = CALLABLES[fn](array_api_compat.numpy, heads, np.float64)

        out, lse = uniattn.attention(
            *mine.values(), **mine_kw, **chunks, backward=mode, return_lse=True
        )
        out, lse = backend.to_numpy(out), backend.to_numpy(lse)
        expected, expected_lse = reference.attention(*rounded.values(), **ref_kw, return_lse=True)
        assert_close(out, expected, dtype, what="output", repro=repro)
        finite = np.isfinite(expected_lse)
        assert np.array_equal(np.isfinite(lse), finite), f"lse -inf rows differ\n{repro}"
        assert_close(lse[finite], expected_lse[finite], dtype, what="lse", repro=repro)

        d_out = backend.asarray(np.random.default_rng(1).standard_normal(out.shape), dtype)
        bias = mine_kw.pop("bias", None)
        primals = [*mine.values()] + ([bias] if _is_array(bias) else [])

        def fn(q, k, v, b=bias):
            return uniattn.attention(q, k, v, bias=b, **mine_kw, **chunks, backward=mode)

        if mode == "autodiff":
            grads = backend.vjp(fn, *primals)[1](d_out)
        else:
            grads = uniattn.vjp(*mine.values(), bias=bias, **mine_kw, **chunks)[1](d_out)
        ref = reference.vjp(*rounded.values(), backend.to_numpy(d_out), **ref_kw)
        names = ["dq", "dk", "dv"] + (["d_bias"] if _is_array(bias) else [])
        actual = {n: backend.to_numpy(g) for n, g in zip(names, grads, strict=True)}
        wanted = {n: getattr(ref, n) for n in names}
        assert_gradients_close(actual, wanted, dtype, what=f"{mode} gradients", repro=repro)

        for name, x in {**arrays, **kw}.items():
            if isinstance(x, np.ndarray):
                assert np.array_equal(x, before[name]), f"{name} was modified\n{repro}"

    check()


def test_chunk_sizes_do_not_change_the_result(backend):
    @settings(max_examples=_budget(backend))
    @given(calls(backend), st.integers(1, 24), st.integers(1, 24))
    def check(call, q_chunk, k_chunk):
        arrays, kw, chunks, _dtype, _mode, _fns = call
        mine = [backend.asarray(x, "float64") for x in arrays.values()]
        mine_kw = {n: _convert(backend, n, x, "float64") for n, x in kw.items()}
        a = backend.to_numpy(uniattn.attention(*mine, **mine_kw, **chunks))
        b = uniattn.attention(*mine, **mine_kw, query_chunk_size=q_chunk, key_chunk_size=k_chunk)
        scale = max(np.max(np.abs(a), initial=0), 1e-300)
        assert_close(backend.to_numpy(b), a, "float64", what="across chunk sizes", scale=scale)

    if "float64" not in backend.dtypes:
        pytest.skip(f"{backend.name} has no float64")
    check()


def _convert(backend, name, x, dtype):
    if not isinstance(x, np.ndarray):
        return x
    return backend.asarray(x, dtype) if name == "bias" else backend.asarray(x)


def _is_array(x) -> bool:
    return hasattr(x, "shape")
