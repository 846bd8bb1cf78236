"""JAX's ring for ``uniattn.ring_attention``: a mesh axis inside ``jax.shard_map``."""

from __future__ import annotations

import jax

from ._base import Ring


class JaxRing(Ring):
    """The devices along mesh axis ``axis_name``; keys and values move by ``ppermute``."""

    def __init__(self, axis_name, group):
        if group is not None:
            raise ValueError(
                "ring_attention on JAX arrays takes axis_name (a jax.shard_map mesh axis), "
                f"not group (a torch.distributed process group); got group={group!r}"
            )
        if axis_name is None:
            raise ValueError(
                "ring_attention on JAX arrays needs axis_name: the mesh axis of the "
                "enclosing jax.shard_map that the sequence is sharded over"
            )
        try:
            self.size = int(jax.lax.axis_size(axis_name))
        except NameError as e:  # JAX: "unbound axis name"
            raise ValueError(
                f"ring_attention: axis_name={axis_name!r} is not a mesh axis of an "
                f"enclosing jax.shard_map ({e})"
            ) from None
        self.axis_name = axis_name
        self._perm = [(i, (i + 1) % self.size) for i in range(self.size)]

    @property
    def rank(self):
        # Read where it is used: the forward and backward are traced apart, and a value
        # of one trace must not leak into the other.
        return jax.lax.axis_index(self.axis_name)

    def shift(self, arrays):
        # XLA schedules the transfers; the blocks computed meanwhile overlap them.
        moved = tuple(
            None if x is None else jax.lax.ppermute(x, self.axis_name, self._perm) for x in arrays
        )
        return lambda: moved

    def sum_replicated(self, x):
        # shard_map's own transpose of the implicit "make varying" sums it over the axis.
        return x

    def check_same_length(self, length):
        pass  # every device of a shard_map has the same shapes
