"""``uniattn.ring_attention``, ``merge``, ``zigzag``: multi-device runs in subprocesses.

JAX runs on 8 simulated CPU devices (``tests/_ring_jax_worker.py``); PyTorch on gloo
processes on 127.0.0.1 (``tests/_ring_torch_worker.py``), every collective under a timeout
and every process under a deadline, so a hang fails instead of stalling the suite.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import uniattn
from conformance.tolerances import TOLERANCES, gradient_scale, relative_error
from uniattn._ring import scores_computed

ROOT = Path(__file__).resolve().parents[1]
DEADLINE = 600  # seconds for a whole multi-process run


def _run(args, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def _finish(processes):
    """Every process's (return code, output); all killed at the deadline."""
    results = []
    try:
        for p in processes:
            out, _ = p.communicate(timeout=DEADLINE)
            results.append((p.returncode, out))
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    return results


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torch_ring(size, *extra):
    pytest.importorskip("torch")
    port = _free_port()
    worker = "tests/_ring_torch_worker.py"
    args = ("--world", str(size), "--port", str(port), *extra)
    return _finish([_run([worker, "--rank", str(r), *args]) for r in range(size)])


@pytest.mark.xdist_group("ring")
def test_jax_ring_matches_whole_sequence():
    pytest.importorskip("jax")
    ((code, out),) = _finish([_run(["tests/_ring_jax_worker.py"])])
    assert code == 0, out[-6000:]
    assert "0 failures" in out


@pytest.mark.xdist_group("ring")
@pytest.mark.parametrize("size", [1, 2, 4])
def test_torch_ring_matches_whole_sequence(size):
    for rank, (code, out) in enumerate(_torch_ring(size)):
        assert code == 0 and "0 failures" in out, f"rank {rank}:\n{out[-6000:]}"


@pytest.mark.xdist_group("ring")
def test_torch_ring_rejects_unequal_shards():
    for rank, (code, out) in enumerate(_torch_ring(2, "--unequal")):
        assert code == 0, f"rank {rank}:\n{out[-3000:]}"


# -- load balance -----------------------------------------------------------------------
def _imbalance(sharding, size=8, n=2048, chunk=64):
    work = [
        scores_computed(r, size, n, sharding=sharding, causal=True, chunk=chunk)
        for r in range(size)
    ]
    return max(work) / (sum(work) / size), work


def test_zigzag_balances_causal_work():
    ratio, work = _imbalance("zigzag")
    assert ratio <= 1.05, work
    contiguous, work = _imbalance("contiguous")
    assert 1.8 < contiguous <= 1.875, work  # 1.875 as chunks shrink: the last rank does 7.5 of 4


def test_scores_computed_counts_what_the_schedule_computes():
    block = 64 * 64
    # One rank holds the whole sequence: causal attention over 4 chunks computes 4 + 3 + 2 + 1.
    assert scores_computed(0, 1, 256, causal=True, chunk=64) == 10 * block
    assert scores_computed(0, 1, 256, chunk=64) == 16 * block
    # Two ranks, contiguous: rank 0 sees only its own keys, rank 1 all of rank 0's too.
    assert [scores_computed(r, 2, 128, causal=True, chunk=64) for r in (0, 1)] == [
        3 * block,
        7 * block,
    ]
    # Zigzag, pieces of 64: rank 0 holds pieces 0 and 3, rank 1 pieces 1 and 2; each
    # computes two diagonal blocks and three whole ones.
    zigzag = [scores_computed(r, 2, 128, sharding="zigzag", causal=True, chunk=64) for r in (0, 1)]
    assert zigzag == [5 * block, 5 * block]


# -- zigzag -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["numpy", "torch", "jax"])
def test_zigzag_gives_each_shard_two_pieces(name):
    from uniattn.backends import harness

    h = harness(name)
    x = h.asarray(np.arange(32, dtype=np.float32).reshape(2, 16))
    z = uniattn.zigzag(x, 2, axis=1)
    shards = np.split(h.to_numpy(z), 2, axis=1)
    # Pieces of 4: shard 0 holds pieces 0 and 3, shard 1 pieces 1 and 2.
    assert shards[0][0].tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert shards[1][0].tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    np.testing.assert_array_equal(h.to_numpy(uniattn.unzigzag(z, 2, axis=1)), h.to_numpy(x))
    np.testing.assert_array_equal(
        h.to_numpy(uniattn.unzigzag(uniattn.zigzag(x, 4, -1), 4, -1)), h.to_numpy(x)
    )


@pytest.mark.parametrize(
    ("shards", "axis", "message"),
    [
        (3, 0, "multiple of 2 \\* shards = 6; got 16"),
        (0, 0, "shards must be a positive int; got 0"),
        (2, 2, "axis must be an int in \\[-1, 1\\); got 2"),
    ],
)
def test_zigzag_errors(shards, axis, message):
    with pytest.raises(ValueError, match=message):
        uniattn.zigzag(np.zeros(16), shards, axis)


# -- merge ------------------------------------------------------------------------------
def _parts(h, layout="BTHD"):
    rng = np.random.default_rng(1)
    shape = (2, 12, 3, 8) if layout == "BTHD" else (2, 3, 12, 8)
    q, k, v = (h.asarray(rng.standard_normal(shape)) for _ in range(3))
    axis = 1 if layout == "BTHD" else 2
    cut = [slice(0, 5), slice(5, 12)]
    take = lambda x, s: x[:, s] if axis == 1 else x[:, :, s]  # noqa: E731
    whole = uniattn.attention(q, k, v, layout=layout, return_lse=True)
    parts = [
        uniattn.attention(q, take(k, s), take(v, s), layout=layout, return_lse=True) for s in cut
    ]
    return (q, k, v), whole, parts


@pytest.mark.parametrize("layout", ["BTHD", "BHTD"])
def test_merge_equals_attention_over_the_union(layout):
    from uniattn.backends import harness

    h = harness("numpy")
    _, whole, parts = _parts(h, layout)
    out, lse = uniattn.merge(*parts, layout=layout)
    np.testing.assert_allclose(out, whole[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, whole[1], rtol=1e-12, atol=1e-12)
    same_out, _ = uniattn.merge(parts[0], layout=layout)
    np.testing.assert_array_equal(same_out, parts[0][0])


def test_merge_keeps_rows_that_see_no_key():
    q = np.ones((1, 2, 1, 4))
    seen = uniattn.attention(q, q, q, return_lse=True)
    none = (np.zeros_like(seen[0]), np.full_like(seen[1], -np.inf))
    out, lse = uniattn.merge(none, none)
    assert np.all(out == 0) and np.all(lse == -np.inf)
    out, lse = uniattn.merge(seen, none)
    np.testing.assert_array_equal(out, seen[0])
    np.testing.assert_array_equal(lse, seen[1])


@pytest.mark.parametrize("name", ["torch", "jax"])
def test_merge_is_differentiable(name):
    from uniattn.backends import harness

    h = harness(name)
    rng = np.random.default_rng(2)
    arrays = [h.asarray(rng.standard_normal((1, 6, 2, 4))) for _ in range(3)]
    d_out = h.asarray(rng.standard_normal((1, 6, 2, 4)))

    def whole(q, k, v):
        out, lse = uniattn.attention(q, k, v, return_lse=True)
        return h.namespace().sum(out * d_out) + h.namespace().sum(lse)

    def merged(q, k, v):
        parts = [
            uniattn.attention(q, k[:, s], v[:, s], return_lse=True)
            for s in (slice(0, 2), slice(2, 6))
        ]
        out, lse = uniattn.merge(*parts)
        return h.namespace().sum(out * d_out) + h.namespace().sum(lse)

    one = h.asarray(np.float64(1.0))
    want = [h.to_numpy(g) for g in h.vjp(whole, *arrays)[1](one)]
    got = [h.to_numpy(g) for g in h.vjp(merged, *arrays)[1](one)]
    # Both sides compute in the arrays' dtype (float32 on JAX without x64): twice the
    # table's budget against the float64 oracle bounds their difference.
    bound = 2 * TOLERANCES[h.dtype_name(arrays[0])].gradient
    for g, w in zip(got, want, strict=True):
        assert relative_error(g, w, gradient_scale(want)) <= bound


def test_merge_errors():
    q = np.ones((1, 2, 1, 4))
    part = uniattn.attention(q, q, q, return_lse=True)
    with pytest.raises(ValueError, match="at least one"):
        uniattn.merge()
    with pytest.raises(TypeError, match="part 1 is"):
        uniattn.merge(part, part[0])
    with pytest.raises(ValueError, match="part 1 has"):
        uniattn.merge(part, (part[0][:, :1], part[1][..., :1]))
    with pytest.raises(ValueError, match="layout must be"):
        uniattn.merge(part, layout="TBHD")


# -- errors -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["numpy", "tensorflow"])
def test_ring_needs_a_framework_with_collectives(name):
    from uniattn.backends import harness

    h = harness(name)
    q = h.asarray(np.zeros((1, 4, 2, 8), np.float32))
    with pytest.raises(NotImplementedError, match=r"runs on JAX .* and on PyTorch"):
        uniattn.ring_attention(q, q, q)


def test_ring_argument_errors():
    q = np.zeros((1, 4, 2, 8), np.float32)
    with pytest.raises(TypeError, match="bias only as a callable"):
        uniattn.ring_attention(q, q, q, bias=np.zeros((4, 4), np.float32))
    with pytest.raises(TypeError, match="mask only as a callable"):
        uniattn.ring_attention(q, q, q, mask=np.ones((4, 4), bool))
    with pytest.raises(ValueError, match="same length along the sequence axis; got 4 and 6"):
        uniattn.ring_attention(
            q, np.zeros((1, 6, 2, 8), np.float32), np.zeros((1, 6, 2, 8), np.float32)
        )
    with pytest.raises(ValueError, match="sharding must be one of"):
        uniattn.ring_attention(q, q, q, sharding="striped")
    odd = np.zeros((1, 5, 2, 8), np.float32)
    with pytest.raises(ValueError, match="shard length must be even; got 5"):
        uniattn.ring_attention(odd, odd, odd, sharding="zigzag")


def test_ring_engine_errors():
    import jax.numpy as jnp

    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="needs axis_name"):
        uniattn.ring_attention(q, q, q)
    with pytest.raises(ValueError, match=r"not a mesh axis of an enclosing jax\.shard_map"):
        uniattn.ring_attention(q, q, q, axis_name="x")
    torch = pytest.importorskip("torch")
    t = torch.zeros(1, 4, 2, 8)
    with pytest.raises(ValueError, match=r"needs torch\.distributed initialised"):
        uniattn.ring_attention(t, t, t)
    with pytest.raises(ValueError, match=r"takes group .* not axis_name"):
        uniattn.ring_attention(t, t, t, axis_name="x")
