"""``ring``: ring attention over P = 1, 2, 4, 8 PyTorch processes (gloo, 127.0.0.1).

One sequence of fixed length (n 8192; ``--quick``: 2048), batch 1, 8 query heads over 2
key/value heads, d 64, float32, causal, sharded contiguously and in zigzag. Per rank: the
median time of a forward+backward pass, its peak memory above the inputs, and the bytes it
sends (counted at the ring's ``shift``, against the formula); and the scores each rank
computes (the chunk pairs of the ring's own schedule), busiest over mean. On a machine with fewer cores than
processes the times show the ring's overheads, not its scaling.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from datetime import timedelta

import numpy as np

from uniattn._ring import scores_computed
from uniattn.bench._common import MiB, Report

SIZES = (1, 2, 4, 8)
HEADS, KV_HEADS, D = 8, 2, 64
CHUNK = 512


def sent_formula(n: int, size: int) -> int:
    """Bytes a rank sends in a forward+backward pass: its k and v shards travel ``P - 1``
    times in each ring (float32), and dK, dV (float32) ``P`` times in the backward."""
    shard = 2 * (n // size) * KV_HEADS * D * 4  # k and v of one rank
    return shard * ((size - 1) * 2 + size) if size > 1 else 0


def work(n: int, size: int, sharding: str) -> tuple[int, float]:
    """The busiest rank's computed scores, and busiest over mean."""
    scores = [
        scores_computed(r, size, n // size, sharding=sharding, causal=True, chunk=CHUNK)
        for r in range(size)
    ]
    return max(scores), max(scores) / (sum(scores) / size)


def _worker(rank: int, size: int, port: int, n: int, sharding: str, repeats: int) -> None:
    import torch
    import torch.distributed as dist

    import uniattn
    from uniattn._measure import harness, timed_peak
    from uniattn.backends import _torch_ring

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=size,
        timeout=timedelta(seconds=300),
    )
    sent = [0]
    shift = _torch_ring.TorchRing.shift

    def counted(self, arrays):
        if self.size > 1:
            sent[0] += sum(x.numel() * x.element_size() for x in arrays if x is not None)
        return shift(self, arrays)

    _torch_ring.TorchRing.shift = counted
    rng = np.random.default_rng(rank)
    local = n // size
    q, d_out = (
        torch.tensor(rng.standard_normal((1, local, HEADS, D)), dtype=torch.float32) for _ in "qo"
    )
    k, v = (
        torch.tensor(rng.standard_normal((1, local, KV_HEADS, D)), dtype=torch.float32)
        for _ in "kv"
    )

    def step(q, k, v):
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        out = uniattn.ring_attention(*leaves, causal=True, sharding=sharding)
        out.backward(d_out)
        return leaves[0].grad

    step(q, k, v)  # warm-up
    sent[0] = 0
    step(q, k, v)
    sent_bytes = sent[0]
    times, peak = [], 0
    for _ in range(repeats):
        dist.barrier()
        seconds, bytes_ = timed_peak(harness("torch"), step, (q, k, v))
        times.append(seconds)
        peak = max(peak, bytes_ or 0)
    dist.destroy_process_group()
    print(
        json.dumps(
            {"rank": rank, "seconds": float(np.median(times)), "peak": peak, "sent": sent_bytes}
        ),
        flush=True,
    )


def measure(n: int, size: int, sharding: str, repeats: int) -> list[dict]:
    """One line per rank from ``size`` worker processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = [str(x) for x in (size, port, n, sharding, repeats)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", __name__, "--worker", str(r), *spec],
            stdout=subprocess.PIPE,
            text=True,
        )
        for r in range(size)
    ]
    lines = []
    try:
        for p in processes:
            out, _ = p.communicate(timeout=1800)
            found = [json.loads(t) for t in out.splitlines() if t.startswith("{")]
            if p.returncode != 0 or not found:
                raise RuntimeError(f"ring worker failed with {p.returncode}:\n{out[-2000:]}")
            lines += found
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    return lines


def run(names, quick: bool = False, full: bool = False) -> Report:
    n, repeats = (2048, 2) if quick else (8192, 3)
    report = Report(
        "ring",
        f"ring attention, torch gloo processes on this host: n={n}, batch 1, {HEADS} heads over "
        f"{KV_HEADS} kv heads, d {D}, float32, causal; forward+backward per rank (median of "
        f"{repeats}); work: scores in the chunk pairs computed (chunks of {CHUNK})",
        [
            "P",
            "sharding",
            "ms (slowest rank)",
            "peak MiB per rank",
            "MiB sent per rank",
            "formula MiB",
            "busiest rank's scores (M)",
            "busiest / mean",
        ],
        raw={"n": n, "rows": []},
    )
    if "torch" not in names:
        return report
    for size in SIZES:
        for sharding in ("contiguous", "zigzag"):
            lines = measure(n, size, sharding, repeats)
            busiest, ratio = work(n, size, sharding)
            row = {
                "P": size,
                "sharding": sharding,
                "seconds": max(x["seconds"] for x in lines),
                "peak": max(x["peak"] for x in lines),
                "sent": max(x["sent"] for x in lines),
                "formula": sent_formula(n, size),
                "pairs": busiest,
                "imbalance": ratio,
            }
            report.raw["rows"].append(row)
            report.rows.append(
                [
                    str(size),
                    sharding,
                    f"{row['seconds'] * 1e3:.0f}",
                    f"{row['peak'] / MiB:.1f}",
                    f"{row['sent'] / MiB:.2f}",
                    f"{row['formula'] / MiB:.2f}",
                    f"{busiest / 1e6:.2f}",
                    f"{ratio:.3f}",
                ]
            )
    return report


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    rank, size, port, n, sharding, repeats = sys.argv[2:]
    _worker(int(rank), int(size), int(port), int(n), sharding, int(repeats))
