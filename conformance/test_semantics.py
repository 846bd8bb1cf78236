"""The semantic rules of ``uniattn.attention``, each checked on every backend."""

from __future__ import annotations

import numpy as np
import pytest

import uniattn
from uniattn import reference

from .cases import CASES, Case
from .harness import prepare
from .tolerances import assert_close, assert_gradients_close

CHUNKINGS = [(1, 1), (1, 7), (5, 3), (13, 29), (16, 16), (64, 64), (10_000, 10_000)]


@pytest.mark.parametrize("chunks", CHUNKINGS, ids=lambda c: f"{c[0]}x{c[1]}")
def test_chunk_size_invariance(backend, chunks):
    """Every chunking, divisors of the lengths or not, gives the reference result."""
    case = Case(
        "chunk-invariance",
        37,
        53,
        causal=True,
        bias=(37, 53),
        mask=(2, 1, 37, 53),
        masked_rows=(4,),
        chunks=chunks,
    )
    p = prepare(backend, case, "float64")
    out = backend.to_numpy(p.call(*p.primals()))
    assert_close(
        out, p.reference_output(), "float64", what=f"output, chunks {chunks}", repro=p.repro
    )


def test_causal_is_bottom_right(backend):
    """causal=True equals an explicit mask ``j <= i + kv_len - q_len`` (q shorter and longer)."""
    for q_len, kv_len in [(5, 12), (12, 5), (9, 9)]:
        case = Case("causal-vs-mask", q_len, kv_len, chunks=(4, 3))
        p = prepare(backend, case, "float64")
        i, j = np.arange(q_len)[:, None], np.arange(kv_len)[None, :]
        explicit = backend.asarray(j <= i + (kv_len - q_len))
        q, k, v = p.primals()
        causal = backend.to_numpy(p.call(q, k, v, causal=True))
        masked = backend.to_numpy(
            uniattn.attention(q, k, v, mask=explicit, query_chunk_size=4, key_chunk_size=3)
        )
        np.testing.assert_allclose(causal, masked, rtol=0, atol=1e-14, err_msg=p.repro)


def test_fully_masked_rows_are_zero(backend):
    """Rows that may attend no key give exactly 0 (not NaN, not the mean of V)."""
    case = CASES["causal-q-longer"]  # bottom-right causal: rows 0..45 see no key
    p = prepare(backend, case, "float32")
    out = backend.to_numpy(p.call(*p.primals()))
    assert np.all(out[:, :46] == 0.0), p.repro
    assert np.all(np.isfinite(out)), p.repro
    assert np.any(out[:, 46:] != 0.0), p.repro


@pytest.mark.needs_autodiff
def test_fully_masked_rows_have_zero_finite_gradients(backend):
    case = CASES["mask-all-off"]
    p = prepare(backend, case, "float32")
    for name, g in p.gradients().items():
        assert np.all(g == 0.0), f"d_{name} is not exactly 0 on a fully masked call\n{p.repro}"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16bit_scores_do_not_overflow(backend, dtype):
    """q.k beyond the float16 range (65504) is fine: scores are accumulated in float32."""
    if dtype not in backend.dtypes:
        pytest.skip(f"{backend.name} has no {dtype}")
    case = Case(
        "overflow-16bit",
        16,
        24,
        d_k=64,
        logit_gain=4000.0,
        chunks=(8, 8),
        scale=1.0,
        integer_qk=True,
    )
    p = prepare(backend, case, dtype)
    scores = np.einsum("bqhd,bkhd->bhqk", p.rounded["query"], p.rounded["key"])
    assert np.max(np.abs(scores)) > 65504  # the case really overflows float16
    out = backend.to_numpy(p.call(*p.primals()))
    assert_close(out, p.reference_output(), dtype, what="output", repro=p.repro)


def test_float64_is_kept(backend):
    p = prepare(backend, CASES["basic"], "float64")
    out = p.call(*p.primals())
    assert backend.dtype_name(out) == "float64"
    assert_close(backend.to_numpy(out), p.reference_output(), "float64", what="output")


def test_layouts_agree(backend):
    """BHTD input gives the BHTD-transposed BTHD result."""
    case = CASES["mask-and-bias-causal"]
    p = prepare(backend, case, "float64")
    bthd = backend.to_numpy(p.call(*p.primals()))
    swapped = [
        backend.asarray(np.swapaxes(p.rounded[n], -3, -2)) for n in ("query", "key", "value")
    ]
    bhtd = backend.to_numpy(p.call(*swapped, p.arrays["bias"], layout="BHTD"))
    np.testing.assert_allclose(np.swapaxes(bhtd, -3, -2), bthd, rtol=0, atol=1e-14)


def test_scale(backend):
    """``scale`` multiplies the scores; the default is 1/sqrt(d_k)."""
    p = prepare(backend, CASES["basic"], "float64")
    q, k, v = p.primals()
    r = p.rounded
    for scale in (None, 0.3, 2.0):
        out = backend.to_numpy(p.call(q, k, v, scale=scale))
        expected = reference.attention(r["query"], r["key"], r["value"], scale=scale)
        assert_close(out, expected, "float64", what=f"output, scale={scale}")


def test_inputs_not_mutated(backend):
    p = prepare(backend, CASES["mask-and-bias-causal"], "float32")
    before = {n: backend.to_numpy(x) for n, x in p.arrays.items() if x is not None}
    p.call(*p.primals())
    if backend.has_autodiff:
        p.gradients()
    for name, value in before.items():
        np.testing.assert_array_equal(backend.to_numpy(p.arrays[name]), value, err_msg=name)


def test_output_type_and_device(backend):
    p = prepare(backend, CASES["gqa"], "float32")
    out = p.call(*p.primals())
    assert backend.is_array_type(type(out))
    assert tuple(out.shape) == p.case.shapes()["d_out"]
    assert backend.device(out) == backend.device(p.arrays["query"])


@pytest.mark.needs_autodiff
def test_no_nan_gradients_with_huge_logits(backend):
    p = prepare(backend, CASES["huge-logits-causal"], "float32")
    grads = p.gradients()
    for name, g in grads.items():
        assert np.all(np.isfinite(g)), f"d_{name} not finite\n{p.repro}"
    assert_gradients_close(
        grads, p.reference_gradients(), "float32", what="huge logits", repro=p.repro
    )
