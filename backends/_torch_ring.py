"""PyTorch's ring for ``uniattn.ring_attention``: a ``torch.distributed`` process group."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ._base import Ring


class TorchRing(Ring):
    """The ranks of ``group``; keys and values move by point-to-point sends."""

    def __init__(self, axis_name, group):
        if axis_name is not None:
            raise ValueError(
                "ring_attention on torch tensors takes group (a torch.distributed process "
                f"group, None: the default group), not axis_name; got axis_name={axis_name!r}"
            )
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "ring_attention on torch tensors needs torch.distributed initialised "
                "(torch.distributed.init_process_group) in every process of the ring"
            )
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self._next = self._global((self.rank + 1) % self.size)
        self._previous = self._global((self.rank - 1) % self.size)

    def _global(self, rank):
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def shift(self, arrays):
        if self.size == 1:
            return lambda: arrays
        sent = [x.contiguous() for x in arrays if x is not None]
        received = [torch.empty_like(x) for x in sent]
        ops = [dist.P2POp(dist.isend, x, self._next, self.group) for x in sent]
        ops += [dist.P2POp(dist.irecv, x, self._previous, self.group) for x in received]
        requests = dist.batch_isend_irecv(ops)

        def wait():
            for request in requests:
                request.wait()
            it = iter(received)
            return tuple(None if x is None else next(it) for x in arrays)

        return wait

    def sum_replicated(self, x):
        x = x.contiguous()
        dist.all_reduce(x, group=self.group)
        return x

    def check_same_length(self, length):
        if self.size == 1:
            return
        mine = torch.tensor([length], dtype=torch.int64)
        lengths = [torch.empty_like(mine) for _ in range(self.size)]
        dist.all_gather(lengths, mine, group=self.group)
        found = [int(n) for n in lengths]
        if len(set(found)) != 1:
            raise ValueError(
                f"ring_attention needs the same shard length on every rank; the ranks "
                f"hold {found} positions (rank {self.rank}: {length})"
            )
