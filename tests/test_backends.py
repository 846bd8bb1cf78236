"""Detection, the registry of backends and the adapters' namespaces."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

import uniattn
from uniattn import _algorithm, _schedule, backends
from uniattn._dispatch import backend_of, backend_of_type

ALGORITHM = [_algorithm, _schedule, backends._base]


def _names_used_by_the_algorithm() -> set[str]:
    """Every ``xp.NAME`` in the algorithm, its schedule and the contract's defaults."""
    names = set()
    for module in ALGORITHM:
        tree = ast.parse(Path(module.__file__).read_text())
        names |= {
            node.attr
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "xp"
        }
    return names


@pytest.mark.parametrize("module", [_algorithm, _schedule], ids=lambda m: m.__name__)
def test_algorithm_modules_name_no_framework(module):
    source = Path(module.__file__).read_text().lower()
    for word in ("numpy", "jax", "torch", "tensorflow", "xla", " np.", " tf.", "keras"):
        assert word not in source, word


@pytest.mark.parametrize("name", backends.available())
def test_namespace_covers_the_algorithm(name):
    namespace = backends.load(name).namespace()
    missing = sorted(n for n in _names_used_by_the_algorithm() if not hasattr(namespace, n))
    assert not missing, f"{name}'s namespace lacks {missing}"


def test_numpy_is_detected():
    x = np.ones(3)
    assert backend_of(query=x).name == "numpy"
    assert backend_of_type(np.ndarray) is backends.load("numpy")


def test_unknown_types_are_not_backends():
    for tp in (list, float, str, type(None)):
        assert backend_of_type(tp) is None


@pytest.mark.parametrize("name", [n for n in backends.REGISTRY if n != "numpy"])
def test_framework_arrays_are_detected(name):
    if importlib.util.find_spec(backends.REGISTRY[name]) is None:
        pytest.skip(f"{name} is not installed")
    backend = backends.harness(name)
    x = backend.asarray(np.ones((3, 2, 4)), "float32")
    assert backend_of(query=x) is backend.adapter
    out = uniattn.attention(x, x, x)
    assert backend.is_array_type(type(out))


@pytest.mark.parametrize("name", list(backends.ARRAY_API_LIBRARIES))
def test_array_library_arrays_are_detected(name):
    """Arrays of an array-API library without a dedicated adapter get the generic adapter
    of their namespace, named after the library, and results of their own type."""
    if importlib.util.find_spec(backends.ARRAY_API_LIBRARIES[name]) is None:
        pytest.skip(f"{name} is not installed")
    backend = backends.harness(name)
    x = backend.asarray(np.ones((3, 2, 4)), "float32")
    found = backend_of(query=x)
    assert found is backend.adapter is backends.load(name)
    assert found.name == name and name in backends.available()
    assert type(found).__name__ == "ArrayAPIBackend"
    out = uniattn.attention(x, x, x)
    assert backend.is_array_type(type(out)) and backend.dtype_name(out) == "float32"


def test_installed_lists_dedicated_adapters_and_available_adds_the_others():
    assert set(backends.installed()) <= set(backends.REGISTRY)
    assert backends.available()[: len(backends.installed())] == backends.installed()


def test_entry_points_are_read_only_for_unknown_types(monkeypatch):
    """A type a dedicated adapter claims is never compared with registered backends."""
    calls = []
    monkeypatch.setattr(backends, "entry_points", lambda: calls.append(1) or {})

    class Unknown:
        pass

    backend_of_type.cache.pop((np.ndarray,), None)
    assert backend_of_type(np.ndarray) is backends.load("numpy")
    assert calls == []
    assert backend_of_type(Unknown) is None
    assert calls == [1]


def test_load_rejects_unknown_names():
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.load("mxnet")
    with pytest.raises(ValueError, match="array-API library"):
        backends.harness("json")  # a module, but no array library


@pytest.mark.parametrize("name", backends.available())
def test_on_places_arrays_and_rejects_unknown_devices(name):
    """``Harness.on``: a copy whose ``asarray`` creates arrays on the device named, with a
    ValueError naming the argument for a device the framework does not have."""
    backend = backends.harness(name)
    placed = backend.on("cpu")
    assert placed is not backend and backend.array_device is None
    x = placed.asarray(np.arange(3.0), "float32")
    assert placed.platform(x) == placed.array_platform() == "cpu"
    assert placed.dtype_name(x) == "float32"
    np.testing.assert_array_equal(placed.to_numpy(x), [0, 1, 2])
    assert "on " in repr(placed)
    with pytest.raises(ValueError, match="device"):
        backend.on("no-such-device:7")


@pytest.mark.parametrize("name", backends.available())
def test_default_chunks_follow_the_device(name):
    """The host CPU gets the CPU-tuned chunks; an accelerator the larger ones."""
    backend = backends.harness(name)
    x = backend.asarray(np.zeros((1, 8, 1, 4)), "float32")
    if backend.platform(x) != "cpu":
        pytest.skip("this machine's default device is an accelerator")
    q_chunk, k_chunk = backend.chunk_sizes(backend.device(x), decoding=False)
    assert (q_chunk, k_chunk) == tuple(backend.adapter.default_chunks)
    decode_chunk = backend.adapter.decode_key_chunk
    assert backend.chunk_sizes(backend.device(x), decoding=True)[1] == decode_chunk


def test_an_accelerator_gets_the_accelerator_chunks():
    class OnAccelerator(type(backends.load("numpy"))):
        def is_accelerator(self, device):
            return True

    backend = OnAccelerator()
    assert backend.chunk_sizes(None, decoding=False) == tuple(backend.accelerator_chunks)
    assert backend.chunk_sizes(None, decoding=True) == (
        backend.accelerator_chunks[0],
        backend.decode_key_chunk,
    )


_DOT = re.compile(
    r"stablehlo\.dot_general.*: \(tensor<([^>]*)>, tensor<([^>]*)>\) -> tensor<([^>]*)>"
)


def _matrix_products(hlo: str) -> list[tuple[str, str, str]]:
    """The element types (lhs, rhs, result) of the matrix products in StableHLO text:
    dot_generals that keep the lhs's rank (a row-wise dot, such as the backward's
    Δ = rowsum(dO ∘ O) in float32, drops it)."""
    found = []
    for lhs, rhs, out in _DOT.findall(hlo):
        lhs, rhs, out = (x.split("x") for x in (lhs, rhs, out))
        if len(out) == len(lhs):
            found.append((lhs[-1], rhs[-1], out[-1]))
    return found


def test_jax_multiplies_bfloat16_operands_into_float32(monkeypatch):
    """Where JAX multiplies 16-bit operands (``multiplies_16bit``: on GPUs and TPUs), every
    matrix product of a bfloat16 call, forward and backward, lowers to a dot_general of two
    bfloat16 operands into float32 (tensor cores), not of lifted float32 operands. Lowered
    on the CPU as a GPU would get it, not run: XLA:CPU lifts them."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    from uniattn.backends.jax import JaxBackend

    if jax.default_backend() == "cpu":
        assert not JaxBackend().multiplies_16bit(None)
    monkeypatch.setattr(JaxBackend, "multiplies_16bit", lambda self, device: True)
    q = jnp.ones((1, 64, 4, 16), jnp.bfloat16)
    kv = jnp.ones((1, 64, 2, 16), jnp.bfloat16)

    def f(q, k, v):
        out = uniattn.attention(q, k, v, causal=True, query_chunk_size=32, key_chunk_size=32)
        return out.astype(jnp.float32).sum()

    for fn, at_least in ((f, 2), (jax.grad(f, argnums=(0, 1, 2)), 2 + 5)):
        products = _matrix_products(jax.jit(fn).lower(q, kv, kv).as_text())
        assert len(products) >= at_least, products
        assert set(products) == {("bf16", "bf16", "f32")}, products


@pytest.mark.parametrize(("q_len", "branches"), [(128, False), (1, True)])
def test_jax_sanitizes_where_keys_meet_many_rows(q_len, branches):
    """JAX's ``cond_call``: a call whose keys each meet many query rows sanitizes its
    operands unconditionally (no conditional in the lowered program: every loop bound is
    static here), a decoding step branches on whether they are finite."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    q, kv = jnp.ones((1, q_len, 4, 16)), jnp.ones((1, 128, 4, 16))

    def f(q, k, v):
        return uniattn.attention(q, k, v, query_chunk_size=32, key_chunk_size=32)

    for fn in (f, jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2))):
        lowered = jax.jit(fn).lower(q, kv, kv).as_text()
        assert ("stablehlo.case" in lowered) == branches


def test_torch_16bit_product_folds_groups_and_broadcasts():
    """torch's float32 product of 16-bit operands (``bmm(out_dtype=...)``, CUDA only) is
    ``a @ b`` for the algorithm's operand shapes: a key chunk broadcast over its group of
    query heads, and full batch axes. Checked on the CPU with a stand-in for CUDA's bmm
    that computes in float32 and records the shapes it multiplies."""
    torch = pytest.importorskip("torch")
    from uniattn.backends.torch import _bmm_float32

    calls = []

    def bmm(a, b, out_dtype):
        calls.append((tuple(a.shape), tuple(b.shape)))
        return torch.bmm(a.float(), b.float()).to(out_dtype)

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, 4, 5, 8, generator=gen).bfloat16()  # [batch, kv_heads, groups, rows, d]
    k = torch.randn(2, 3, 1, 6, 8, generator=gen).bfloat16()  # a key chunk: one per group
    p = torch.randn(2, 3, 4, 5, 6, generator=gen).bfloat16()
    for x, y in ((a, k.transpose(-1, -2)), (p, k), (a.transpose(-1, -2), p)):
        got = _bmm_float32(x, y, bmm)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, torch.matmul(x.float(), y.float()))
    # The broadcast key chunk is multiplied once per key/value head (groups folded into rows).
    assert calls[0] == ((6, 20, 8), (6, 8, 6)) and calls[1] == ((6, 20, 6), (6, 6, 8))
    assert calls[2] == ((24, 8, 5), (24, 5, 6))
