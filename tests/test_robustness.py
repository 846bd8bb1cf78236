"""Calls from many threads, under torch's no-grad modes, and with JAX's x64 off."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import uniattn
from uniattn import reference

OPTIONS = [
    {},
    {"causal": True},
    {"window": (3, 0), "query_chunk_size": 4},
    {"key_lengths": np.array([5, 9]), "key_chunk_size": 3},
]


def _backend(framework: str):
    from uniattn import backends

    if framework not in backends.installed():
        pytest.skip(f"{framework} is not installed")
    return backends.harness(framework)


def _on(backend, options: dict) -> dict:
    """``options`` with its NumPy arrays (lengths) in the backend's framework."""
    return {n: backend.asarray(x) if isinstance(x, np.ndarray) else x for n, x in options.items()}


def _inputs(seed, q_len=13, kv_len=11):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((2, n, 4, 8)) for n in (q_len, kv_len, kv_len)]


def test_threads_share_nothing():
    """Concurrent calls with different options and shapes give the serial results (the
    staged variants are cached per options; nothing else is shared)."""
    jobs = [(_inputs(i, 9 + i % 5, 7 + i % 3), OPTIONS[i % len(OPTIONS)]) for i in range(32)]
    serial = [uniattn.attention(*arrays, **kw) for arrays, kw in jobs]
    with ThreadPoolExecutor(8) as pool:
        threaded = list(pool.map(lambda job: uniattn.attention(*job[0], **job[1]), jobs))
    for a, b in zip(serial, threaded, strict=True):
        np.testing.assert_array_equal(a, b)


def test_torch_threads_and_no_grad_modes():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    q, k, v = (torch.from_numpy(x).float().requires_grad_() for x in _inputs(0))
    expected = uniattn.attention(q, k, v, causal=True)
    assert expected.requires_grad
    with torch.no_grad():
        out = uniattn.attention(q, k, v, causal=True)
    assert not out.requires_grad
    torch.testing.assert_close(out, expected.detach(), rtol=0, atol=0)
    with torch.inference_mode():
        out = uniattn.attention(q, k, v, causal=True)
    assert out.is_inference()
    torch.testing.assert_close(out, expected.detach(), rtol=0, atol=0)
    with ThreadPoolExecutor(4) as pool:
        grads = list(pool.map(lambda _: torch.autograd.grad(
            uniattn.attention(q, k, v, causal=True).sum(), (q, k, v)), range(8)))  # fmt: skip
    for g in grads[1:]:
        for a, b in zip(grads[0], g, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_jax_without_x64(tmp_path):
    """With x64 off (JAX's default), float32 inputs and int lengths work and match NumPy."""
    pytest.importorskip("jax", reason="jax is not installed")
    code = (
        "import json, numpy as np, jax, jax.numpy as jnp, uniattn\n"
        "rng = np.random.default_rng(0)\n"
        "q, k, v = (rng.standard_normal((2, n, 4, 8)).astype(np.float32) for n in (13, 11, 11))\n"
        "lengths = np.array([5, 11])\n"
        "ref = uniattn.attention(q, k, v, causal=True, key_lengths=lengths)\n"
        "out = uniattn.attention(*map(jnp.asarray, (q, k, v)), causal=True,\n"
        "                        key_lengths=jnp.asarray(lengths))\n"
        "g = jax.grad(lambda q: uniattn.attention(q, jnp.asarray(k), jnp.asarray(v)).sum())(jnp.asarray(q))\n"
        "print(json.dumps([bool(jax.config.jax_enable_x64), str(out.dtype),\n"
        "                  float(np.max(np.abs(np.asarray(out) - ref))), bool(np.isfinite(g).all())]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                            capture_output=True, text=True, check=True)  # fmt: skip
    x64, dtype, err, finite = json.loads(result.stdout.strip().splitlines()[-1])
    assert (x64, dtype, finite) == (False, "float32", True)
    assert err < 1e-5


@pytest.mark.parametrize("garbage", ["non-finite", "huge"])
@pytest.mark.parametrize("framework", ["numpy", "torch", "jax", "tensorflow"])
def test_garbage_in_padded_keys_stays_out(framework, garbage):
    """Garbage in keys and values past ``key_lengths`` changes nothing: not the output, not
    the gradients. NaN and inf send the call down its safe branch, which zeroes the padding
    (a masked key's zero probability times NaN would be NaN); huge finite values take the
    fast branch, which leaves the padding as it is (zero times a finite value is 0)."""
    backend = _backend(framework)
    rng = np.random.default_rng(0)
    q, k, v, d_out = (rng.standard_normal((2, 9, 2, 4)).astype(np.float32) for _ in range(4))
    lengths = np.array([6, 9])
    dirty_k, dirty_v = k.copy(), v.copy()
    if garbage == "non-finite":
        dirty_k[0, 6:], dirty_v[0, 6:] = np.inf, np.nan
    else:  # finite, and so are their sums: scores of about 1e30 where the padding is
        dirty_k[0, 6:], dirty_v[0, 6:] = 1e30, -1e30

    def run(k, v):
        arrays = [backend.asarray(x, "float32") for x in (q, k, v, d_out)]
        kw = {"key_lengths": backend.asarray(lengths, "int32"), "causal": True, "key_chunk_size": 4}
        out, vjp_fn = uniattn.vjp(*arrays[:3], **kw)
        return [backend.to_numpy(x) for x in (out, *vjp_fn(arrays[3]))]

    for clean, dirty in zip(run(k, v), run(dirty_k, dirty_v), strict=True):  # out, dq, dk, dv
        np.testing.assert_allclose(dirty, clean, rtol=1e-6, atol=1e-6)


def _layouts_numpy(x):
    """The same values as ``x`` in Fortran order, reversed (negative strides) and read-only."""
    fortran = np.asfortranarray(x)
    reversed_view = np.ascontiguousarray(x[:, ::-1])[:, ::-1]
    read_only = x.copy()
    read_only.flags.writeable = False
    return {"fortran": fortran, "negative-stride": reversed_view, "read-only": read_only}


@pytest.mark.parametrize("kind", ["fortran", "negative-stride", "read-only"])
def test_numpy_memory_layouts(kind):
    arrays = _inputs(3)
    odd = [_layouts_numpy(x)[kind] for x in arrays]
    assert all(np.array_equal(a, b) for a, b in zip(arrays, odd, strict=True))
    for options in OPTIONS:
        out, vjp_fn = uniattn.vjp(*odd, **options)
        expected, expected_vjp = uniattn.vjp(*arrays, **options)
        np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-13)
        d_out = np.ones_like(out)
        for g, e in zip(vjp_fn(d_out), expected_vjp(d_out), strict=True):
            np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-13)
        semantics = {n: x for n, x in options.items() if not n.endswith("chunk_size")}
        np.testing.assert_allclose(out, reference.attention(*arrays, **semantics), rtol=1e-10)


def test_torch_strided_tensors():
    """Transposed views (a BHTD tensor read as BTHD), expanded (stride-0) keys and sliced
    tensors give the contiguous results, in values and gradients."""
    torch = pytest.importorskip("torch", reason="torch is not installed")
    backend = _backend("torch")
    q, k, v = (torch.from_numpy(x) for x in _inputs(4))
    views = {
        "transposed": [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v)],
        "sliced": [torch.cat([x, x], dim=-1)[..., ::2] for x in (q, k, v)],
        "expanded": [q, k[:, :, :1].expand_as(k), v[:, :, :1].expand_as(v)],
    }
    for name, tensors in views.items():
        assert not all(t.is_contiguous() for t in tensors), name
        dense = [t.contiguous().requires_grad_() for t in tensors]
        strided = [t.detach().requires_grad_() for t in tensors]
        for options in map(functools.partial(_on, backend), OPTIONS):
            expected = uniattn.attention(*dense, **options)
            out = uniattn.attention(*strided, **options)
            torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-13, msg=name)
            grads = torch.autograd.grad(out.sum(), strided)
            for g, e in zip(grads, torch.autograd.grad(expected.sum(), dense), strict=True):
                torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-13, msg=name)


def _global_state() -> dict:
    """What a library must not change behind its caller's back, per loaded framework."""
    import warnings

    state = {"numpy errstate": np.geterr(), "warnings filters": _own_filters(warnings.filters)}
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        state |= {
            "torch default dtype": torch.get_default_dtype(),
            "torch threads": torch.get_num_threads(),
            "torch grad enabled": torch.is_grad_enabled(),
            "torch deterministic": torch.are_deterministic_algorithms_enabled(),
            "torch matmul precision": torch.get_float32_matmul_precision(),
        }
    if "jax" in sys.modules:
        jax = sys.modules["jax"]
        names = ("jax_enable_x64", "jax_default_matmul_precision", "jax_disable_jit")
        state |= {f"jax {n}": getattr(jax.config, n) for n in names}
    if "tensorflow" in sys.modules:
        tf = sys.modules["tensorflow"]
        state |= {
            "tf device policy": tf.config.experimental.get_device_policy(),
            "tf eager": tf.executing_eagerly(),
            "tf32": tf.config.experimental.tensor_float_32_execution_enabled(),
            "tf soft placement": tf.config.get_soft_device_placement(),
        }
    return state


def _own_filters(filters) -> list:
    """Warning filters, less those for warnings of packages imported since the test began:
    a framework's lazy import registers its own (torch's checkpoint imports sympy, which
    adds a "once" filter for SymPyDeprecationWarning), a side effect of the import."""
    imported_since = {m.partition(".")[0] for m in sys.modules} - _MODULES_AT_START
    return [f for f in filters if f[2].__module__.partition(".")[0] not in imported_since]


_MODULES_AT_START = {m.partition(".")[0] for m in sys.modules}


@pytest.mark.parametrize("framework", ["numpy", "torch", "jax", "tensorflow"])
def test_no_global_state_changes(framework):
    """A forward and a gradient (both modes) leave every framework setting as it was."""
    backend = _backend(framework)
    before = _global_state()
    arrays = [backend.asarray(x, "float32") for x in _inputs(5)]
    modes = ["custom", "autodiff"] if backend.has_autodiff else ["custom"]
    for mode, options in zip(modes * 2, OPTIONS, strict=False):
        out, vjp_fn = uniattn.vjp(*arrays, backward=mode, **_on(backend, options))
        vjp_fn(out)
    uniattn.attention(*arrays, causal=True)
    assert _global_state() == before
