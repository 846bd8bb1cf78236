"""One rank of the torch.distributed ring tests (``tests/test_ring.py`` starts them).

Every rank builds the same whole sequence from one seed, computes ``uniattn.attention`` on
it, runs ``uniattn.ring_attention`` on its shard and checks its rows of the values, the
logsumexp and every gradient. Exits 0 when all cases pass; prints each failure.
"""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

import uniattn

RTOL = 1e-10  # float64: the ring's sums differ from one call's only in order


def cases():
    def bias(i, j):
        return -0.05 * (i - j).abs().to(torch.float64)

    yield "plain", {}
    yield "causal", {"causal": True}
    yield "window", {"causal": True, "window": (9, 0)}
    yield "two-sided window", {"window": (5, 7)}
    yield "segments", {"causal": True, "segment_ids": True}
    yield "sinks softcap bias", {"sinks": True, "softcap": 3.0, "bias": bias}


def shard(x, rank, size, axis, sharding):
    if sharding == "zigzag":
        x = uniattn.zigzag(x, size, axis)
    return torch.chunk(x, size, dim=axis)[rank].contiguous()


def check(name, got, want, failures):
    err = (got - want).abs().max().item()
    scale = max(want.abs().max().item(), 1e-300)
    if not err <= RTOL * scale:
        failures.append(f"{name}: max error {err:.3e} > {RTOL:.0e} x {scale:.3e}")


def unequal_shards(rank):
    """Each rank passes a different length: every rank must get the same clear error."""
    q = torch.zeros(1, 8 + 2 * rank, 2, 4, dtype=torch.float64)
    try:
        uniattn.ring_attention(q, q, q)
    except ValueError as e:
        ok = "same shard length on every rank" in str(e)
        print(f"rank {rank}: {'expected' if ok else 'unexpected'} error: {e}", flush=True)
        return 0 if ok else 1
    finally:
        dist.destroy_process_group()
    print(f"rank {rank}: no error for unequal shards", flush=True)
    return 1


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--unequal", action="store_true", help="check unequal shards' error")
    args = parser.parse_args()
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{args.port}",
        rank=args.rank,
        world_size=args.world,
        timeout=timedelta(seconds=120),
    )
    rank, size = args.rank, args.world
    torch.set_num_threads(1)
    if args.unequal:
        return unequal_shards(rank)
    rng = np.random.default_rng(0)
    batch, n, heads, kv_heads, d = 2, 16 * size, 4, 2, 8
    full = {
        name: torch.tensor(rng.standard_normal((batch, n, h, d)))
        for name, h in (("q", heads), ("k", kv_heads), ("v", kv_heads))
    }
    d_out = torch.tensor(rng.standard_normal((batch, n, heads, d)))
    d_lse = torch.tensor(rng.standard_normal((batch, heads, n)))
    sinks = torch.tensor(rng.standard_normal(heads))
    ids = torch.tensor(np.sort(rng.integers(0, 4, (batch, n)), axis=-1))
    failures = []
    for sharding in ("contiguous", "zigzag"):
        for name, case in cases():
            case = dict(case)
            with_ids, with_sinks = case.pop("segment_ids", False), case.pop("sinks", False)
            extra = {"segment_ids": ids} if with_ids else {}
            leaves = {k: x.clone().requires_grad_() for k, x in full.items()}
            if with_sinks:
                leaves["sinks"] = sinks.clone().requires_grad_()
                extra["sinks"] = leaves["sinks"]
            out, lse = uniattn.attention(
                leaves["q"], leaves["k"], leaves["v"], return_lse=True, **extra, **case
            )
            ((out * d_out).sum() + (lse * d_lse).sum()).backward()
            want = {
                "out": shard(out.detach(), rank, size, 1, sharding),
                "lse": shard(lse.detach(), rank, size, 2, sharding),
                **{
                    f"d{k}": shard(x.grad, rank, size, 1, sharding)
                    for k, x in leaves.items()
                    if k != "sinks"
                },
            }
            if with_sinks:
                want["dsinks"] = leaves["sinks"].grad
            mine = {k: shard(x, rank, size, 1, sharding).requires_grad_() for k, x in full.items()}
            extra = {"segment_ids": shard(ids, rank, size, 1, sharding)} if with_ids else {}
            if with_sinks:
                mine["sinks"] = sinks.clone().requires_grad_()
                extra["sinks"] = mine["sinks"]
            out, lse = uniattn.ring_attention(
                mine["q"],
                mine["k"],
                mine["v"],
                sharding=sharding,
                return_lse=True,
                query_chunk_size=4,
                key_chunk_size=4,
                **extra,
                **case,
            )
            d_out_mine = shard(d_out, rank, size, 1, sharding)
            d_lse_mine = shard(d_lse, rank, size, 2, sharding)
            ((out * d_out_mine).sum() + (lse * d_lse_mine).sum()).backward()
            got = {"out": out.detach(), "lse": lse.detach()}
            got.update({f"d{k}": x.grad for k, x in mine.items()})
            for key in want:
                check(
                    f"P={size} {sharding} {name} {key} (rank {rank})", got[key], want[key], failures
                )
    dist.destroy_process_group()
    for f in failures:
        print("FAIL", f, flush=True)
    print(f"rank {rank}: {len(failures)} failures", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
