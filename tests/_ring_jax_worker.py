"""The JAX ring tests on 8 simulated CPU devices (``tests/test_ring.py`` runs this file in
a subprocess: the device count is fixed before JAX is imported).

Checks ``uniattn.ring_attention`` in float32 inside ``jax.shard_map`` against
``uniattn.attention`` in float64 on the whole sequence, within the float32 row of the
tolerance table (values, logsumexp and the gradients of q, k, v and sinks), and plain
``uniattn.attention`` inside ``jax.shard_map`` with its default checks. Exits 0 when all
pass; prints each failure.
"""

from __future__ import annotations

import os
import sys

# LLVM's optimiser takes most of a compile, and the ring compiles every step of itself.
os.environ["XLA_FLAGS"] = (
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
)

import jax

jax.config.update("jax_enable_x64", True)  # the reference runs in float64

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import uniattn  # noqa: E402
from conformance.tolerances import TOLERANCES, gradient_scale, relative_error  # noqa: E402

DTYPE = "float32"


def bias(i, j):
    return -0.05 * jnp.abs(i - j).astype(jnp.float32)


#: (devices, sharding, case): rings of 4 and 2, each sharding and feature set at least
#: once (JAX compiles every step of the ring, each zigzag step four block pairs: few, small
#: rings keep the suite short; the torch tests cover a ring of one; attention inside
#: shard_map below runs on all 8 devices).
CASES = [
    (4, "zigzag", "causal window segments"),
    (4, "contiguous", "causal window segments"),
    (2, "zigzag", "sinks softcap bias"),
]


def keywords(case, ids, sinks):
    if case == "causal window segments":
        return {"causal": True, "window": (40, 0), "segment_ids": ids}
    return {"sinks": sinks, "softcap": 3.0, "bias": bias}


def mesh_of(devices):
    auto = (jax.sharding.AxisType.Auto,)
    return jax.make_mesh((devices,), ("x",), devices=jax.devices()[:devices], axis_types=auto)


def run_case(devices, sharding, kw, inputs, cotangents):
    """``(out, lse, dq, dk, dv, dsinks)`` over the ring in float32 and of the whole
    sequence in float64 (``dsinks`` empty without sinks)."""
    q, k, v, sinks, ids = inputs
    with_sinks = kw.pop("sinks", None) is not None
    ring_kw = dict(kw)

    def whole(q, k, v, s):
        return uniattn.attention(q, k, v, return_lse=True, sinks=s, **kw)

    def ring(q, k, v, ids_, s):
        if "segment_ids" in ring_kw:
            ring_kw["segment_ids"] = ids_
        return uniattn.ring_attention(
            q,
            k,
            v,
            axis_name="x",
            sharding=sharding,
            return_lse=True,
            sinks=s,
            query_chunk_size=8,
            key_chunk_size=8,
            **ring_kw,
        )

    def order(x, axis):
        return uniattn.zigzag(x, devices, axis) if sharding == "zigzag" else x

    def restore(x, axis):
        return uniattn.unzigzag(x, devices, axis) if sharding == "zigzag" else x

    spec = P(None, "x")
    sharded = jax.shard_map(
        ring,
        mesh=mesh_of(devices),
        in_specs=(spec,) * 4 + (P(),),
        out_specs=(spec, P(None, None, "x")),
    )

    def over_ring(q, k, v, s):
        out, lse = sharded(order(q, 1), order(k, 1), order(v, 1), order(ids, 1), s)
        return restore(out, 1), restore(lse, 2)

    results = []
    for fn, dtype in ((jax.jit(over_ring), DTYPE), (whole, "float64")):
        q_, k_, v_, s_ = (x.astype(dtype) for x in (q, k, v, sinks))
        if with_sinks:
            (out, lse), pullback = jax.vjp(fn, q_, k_, v_, s_)
        else:
            (out, lse), pullback = jax.vjp(lambda q, k, v, fn=fn: fn(q, k, v, None), q_, k_, v_)
        grads = pullback(tuple(x.astype(dtype) for x in cotangents))
        results.append((out, lse, *grads[:3], grads[3] if with_sinks else jnp.zeros(0)))
    return results


def main():
    rng = np.random.default_rng(0)
    batch, n, heads, kv_heads, d = 1, 128, 4, 2, 16
    q, k, v = (
        jnp.asarray(rng.standard_normal((batch, n, h, d)), DTYPE)
        for h in (heads, kv_heads, kv_heads)
    )
    d_out = jnp.asarray(rng.standard_normal((batch, n, heads, d)), DTYPE)
    d_lse = jnp.asarray(rng.standard_normal((batch, heads, n)), DTYPE)
    sinks = jnp.asarray(rng.standard_normal(heads), DTYPE)
    ids = jnp.asarray(np.sort(rng.integers(0, 5, (batch, n)), axis=-1), jnp.int32)
    tol = TOLERANCES[DTYPE]
    failures = []

    def compare(label, got, want):
        names = ("out", "lse", "dq", "dk", "dv", "dsinks")
        scale = gradient_scale([np.asarray(w) for w in want[2:]])
        for i, (name, g, w) in enumerate(zip(names, got, want, strict=True)):
            bound, of = (tol.forward, None) if i < 2 else (tol.gradient, scale)
            err = relative_error(np.asarray(g), np.asarray(w), of)
            if not err <= bound:
                failures.append(f"{label} {name}: relative error {err:.3e} > {bound:g}")

    for devices, sharding, case in CASES:
        got, want = run_case(
            devices, sharding, keywords(case, ids, sinks), (q, k, v, sinks, ids), (d_out, d_lse)
        )
        compare(f"{devices} devices, {sharding}, {case}:", got, want)

    # uniattn.attention itself inside shard_map (batch sharded), default checks.
    mesh = mesh_of(8)
    qb, kb, vb = (jnp.tile(x, (8, 1, 1, 1)) for x in (q, k, v))
    idsb = jnp.tile(ids, (8, 1))

    def local(q, k, v, ids, s):
        return uniattn.attention(q, k, v, causal=True, segment_ids=ids, sinks=s, softcap=3.0)

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P("x"),) * 4 + (P(),), out_specs=P("x"))
    got = jax.jit(
        jax.value_and_grad(lambda q, s: jnp.sum(sharded(q, kb, vb, idsb, s) * qb), (0, 1))
    )(qb, sinks)
    want = jax.value_and_grad(lambda q, s: jnp.sum(local(q, kb, vb, idsb, s) * qb), (0, 1))(
        qb, sinks
    )
    for name, g, w in zip(
        ("value", "dq", "dsinks"), (got[0], *got[1]), (want[0], *want[1]), strict=True
    ):
        err = relative_error(np.asarray(g), np.asarray(w))
        if not err <= tol.gradient:  # the same float32 computation, one per device
            failures.append(f"attention inside shard_map {name}: relative error {err:.3e}")
    for f in failures:
        print("FAIL", f, flush=True)
    print(f"{len(CASES)} ring cases and attention inside shard_map: {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
