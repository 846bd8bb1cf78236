"""The generic adapter: array-api-strict (at its strictest, and on its other devices), Dask
(lazy graphs, chunked inputs), dispatch per namespace and the error for unknown arrays."""

from __future__ import annotations

import numpy as np
import pytest

import uniattn
from conformance.cases import CASES
from conformance.harness import prepare
from conformance.tolerances import assert_close, assert_gradients_close
from uniattn import backends, reference
from uniattn._dispatch import backend_of, generic_backend_of

#: A representative part of the case table: overlapping chunks, rows that see no key,
#: broadcast bias and mask, grouped heads in both layouts, windows, lengths, callables,
#: decoding, packing, sinks, soft-capping, dropout and empty shapes.
CASE_NAMES = [
    "non-divisible",
    "causal-q-longer",
    "mask-and-bias-causal",
    "gqa-mask-bhtd",
    "window-bhtd-mask",
    "lengths-causal-gqa",
    "callables-window-lengths",
    "decode-gqa-lengths",
    "bias-minus-inf",
    "empty-batch-lengths",
    "no-keys",
    "top-left-window",
    "packed-uneven-chunks",
    "sinks-gqa-window",
    "softcap-bias-causal",
    "dropout-causal-uneven",
    "everything",
]


def _check_case(backend, name, dtype="float64"):
    """Forward, logsumexp and ``uniattn.vjp`` of a case against the reference; returns the
    prepared case and its output."""
    p = prepare(backend, CASES[name], dtype)
    out, lse = p.call(*p.primals(), return_lse=True)
    assert backend.is_array_type(type(out)) and backend.is_array_type(type(lse))
    assert backend.dtype_name(out) == dtype
    assert_close(backend.to_numpy(out), p.reference_output(), dtype, what="output", repro=p.repro)
    assert_gradients_close(
        p.vjp_gradients(), p.reference_gradients(), dtype, what="uniattn.vjp", repro=p.repro
    )
    return p, out


# -- array-api-strict -----------------------------------------------------------------------


@pytest.fixture
def strict():
    pytest.importorskip("array_api_strict")
    return backends.harness("array_api_strict")


def test_strict_arrays_get_the_generic_adapter(strict):
    xp = strict.namespace()
    x = xp.ones((2, 5, 1, 4))
    found = backend_of(query=x)
    assert found is strict.adapter is backends.load("array_api_strict")
    assert found.name == "array_api_strict" and found.namespace() is xp
    assert found.dtypes == ("float32", "float64")  # array-api-strict has no 16-bit floats
    assert not found.has_autodiff and not found.lazy
    out, lse = uniattn.attention(x, x, x, return_lse=True)
    assert type(out) is type(x) and type(lse) is type(x)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_strict_at_its_strictest(strict, name):
    """The standard's 2024.12 version (the oldest the algorithm needs: where() with a
    Python scalar), no data-dependent shapes, no boolean indexing, no extensions."""
    import array_api_strict

    flags = dict(boolean_indexing=False, data_dependent_shapes=False, enabled_extensions=())
    with array_api_strict.ArrayAPIStrictFlags(api_version="2024.12", **flags):
        _check_case(strict, name)


@pytest.mark.parametrize("name", ["mask-and-bias-causal", "lengths-causal-gqa", "everything"])
def test_strict_results_stay_on_the_inputs_device(strict, name):
    """Inputs on array-api-strict's ``device1``: every array the algorithm creates must be
    there too (array-api-strict refuses to mix devices), and so are the results."""
    placed = strict.on("device1")
    p, out = _check_case(placed, name)
    device = placed.device(p.arrays["query"])
    assert "device1" in str(device)
    assert placed.device(out) == device
    _, vjp_fn = uniattn.vjp(
        *p.primals()[:3], bias=p.arrays["bias"], **p.case.kwargs(), **p.others()
    )
    assert all(placed.device(g) == device for g in vjp_fn(p.arrays["d_out"]))


def test_strict_harness(strict):
    x = strict.asarray(np.arange(6.0).reshape(2, 3), "float32")
    assert strict.dtype_name(x) == "float32"
    np.testing.assert_array_equal(strict.to_numpy(x), np.arange(6.0).reshape(2, 3))
    assert strict.platform(x) == "cpu" and strict.on("device1").array_platform() == "cpu"
    assert strict.version()
    with pytest.raises(ValueError, match="no float16"):
        strict.asarray(np.zeros(2), "float16")
    with pytest.raises(ValueError, match="device1"):
        strict.on("gpu:3")


# -- Dask -----------------------------------------------------------------------------------


@pytest.fixture
def dask():
    pytest.importorskip("dask.array")
    return backends.harness("dask")


def _counting_computes():
    """A Dask callback counting the graphs computed while it is active."""
    from dask.callbacks import Callback

    class Count(Callback):
        computed = 0

        def _start(self, dsk):
            Count.computed += 1

    return Count()


def test_dask_builds_a_graph_and_computes_nothing(dask):
    """A call returns a Dask array whose graph is not computed yet (the adapter's
    conditional takes the safe branch rather than compute a predicate); ``.compute()``
    gives the reference, forward and ``uniattn.vjp``, for inputs in several chunks."""
    import dask.array as da

    rng = np.random.default_rng(0)
    q, k, v, d_out = (rng.standard_normal((2, 40, 2, 8)) for _ in range(4))
    lazy = [da.from_array(x, chunks=(1, 16, 2, 8)) for x in (q, k, v, d_out)]
    options = dict(causal=True, query_chunk_size=8, key_chunk_size=16)
    counter = _counting_computes()
    with counter:
        out = uniattn.attention(*lazy[:3], **options)
        _, vjp_fn = uniattn.vjp(*lazy[:3], **options)
        grads = vjp_fn(lazy[3])
    assert counter.computed == 0
    assert isinstance(out, da.Array) and all(isinstance(g, da.Array) for g in grads)
    np.testing.assert_allclose(out.compute(), reference.attention(q, k, v, causal=True), atol=1e-13)
    expected = reference.vjp(q, k, v, d_out, causal=True)
    for got, want in zip(grads, (expected.dq, expected.dk, expected.dv), strict=True):
        np.testing.assert_allclose(got.compute(), want, atol=1e-12)


def test_dask_computes_only_the_bounds_lengths_set(dask):
    """With key lengths, the loop bounds they set are computed while the graph is built
    (a few 0-d arrays); the attention itself is not."""
    import dask.array as da

    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((2, 24, 2, 8)) for _ in range(3))
    lengths = np.array([24, 9], np.int32)
    counter = _counting_computes()
    with counter:
        out = uniattn.attention(
            *(da.asarray(x) for x in (q, k, v)),
            key_lengths=da.asarray(lengths),
            query_chunk_size=8,
            key_chunk_size=8,
        )
    assert 0 < counter.computed <= 6  # a bound of each of the 3 row blocks' bands
    expected = reference.attention(q, k, v, key_lengths=lengths)
    np.testing.assert_allclose(out.compute(), expected, atol=1e-13)


def test_dask_graph_grows_with_the_chunk_pairs(dask):
    """The graph holds a bounded number of tasks per chunk pair (README, "Other array
    libraries"): doubling the length at fixed chunks quadruples the pairs, not more."""
    import dask.array as da

    rng = np.random.default_rng(2)

    def tasks(n):
        q, k, v = (da.asarray(rng.standard_normal((1, n, 2, 16))) for _ in range(3))
        out = uniattn.attention(q, k, v, query_chunk_size=32, key_chunk_size=32)
        return len(out.__dask_graph__())

    small, large = tasks(128), tasks(256)  # 16 and 64 chunk pairs
    assert 10 * 16 < small < 40 * 16 and 10 * 64 < large < 40 * 64
    assert 3 < large / small < 4


@pytest.mark.parametrize("name", ["lengths-causal-gqa", "empty-batch-lengths", "everything"])
def test_dask_cases(dask, name):
    _check_case(dask, name)


# -- dispatch and errors ----------------------------------------------------------------------


def test_unknown_arrays_get_a_type_error_naming_what_is_supported():
    class NotAnArray:
        shape = (2, 3, 1, 4)

    with pytest.raises(TypeError) as info:
        uniattn.attention(NotAnArray(), NotAnArray(), NotAnArray())
    message = str(info.value)
    for part in (
        "query",
        "NotAnArray",
        "numpy, jax, torch, tensorflow",
        "array_api_compat",
        "__array_namespace__",
        "array_api_strict, dask",
        "docs/backends.md",
        "'uniattn.backends'",
    ):
        assert part in message, (part, message)


def test_numpy_scalars_are_not_arrays_of_the_generic_adapter():
    """array-api-compat gives a NumPy scalar NumPy's namespace: that namespace is the
    dedicated adapter's, so the scalar stays an unsupported argument."""
    x = np.ones((2, 3, 1, 4))
    assert generic_backend_of(np.float64(1.0)) is None
    with pytest.raises(TypeError, match="bias must be an array"):
        uniattn.attention(x, x, x, bias=np.float64(1.0))


def test_an_object_with_array_namespace_is_served_by_its_namespace(strict):
    """Arrays are found by ``__array_namespace__`` too, one adapter per namespace."""

    class Wrapped:
        def __array_namespace__(self, api_version=None):
            return strict.namespace()

    found = generic_backend_of(Wrapped())
    assert found is strict.adapter and found.is_array_type(Wrapped)


def test_arrays_of_two_array_libraries_are_rejected(strict, dask):
    import dask.array as da

    x = strict.namespace().ones((2, 5, 1, 4))
    with pytest.raises(TypeError, match=r"one framework.*array_api_strict.*key is a dask"):
        uniattn.attention(x, da.ones((2, 5, 1, 4)), x)
