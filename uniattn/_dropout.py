"""The dropout mask as a counter-based hash, in array-API integer operations.

Whether the probability of query ``i`` for key ``j`` (batch ``b``, query head ``h``) is kept
depends on nothing but ``(seed, b, h, i, j)``, so any chunk of the mask is computed where it
is used, the backward regenerates it, and every backend, chunk size and layout gives the
same mask. :func:`uniattn.reference.dropout_keep` states the hash on unsigned 32-bit
integers; here the same bits are computed on int32 (products wrap modulo 2**32 in two's
complement, and ``>>`` is made logical by masking the sign's copies), because int32 is the
integer type every framework computes with.
"""

from __future__ import annotations

import math

SEED_SALT = 0x243F6A88
KEY_SALT = 0x85A308D3
FINAL = 0x9E3779B1
_FMIX = (0x85EBCA6B, 0xC2B2AE35)


def _int32(value: int) -> int:
    """An unsigned 32-bit constant as the int32 with the same bits."""
    return value - 2**32 if value >= 2**31 else value


class Hash:
    """The dropout hash of one call: ``xp``, its device, and int32 constants."""

    def __init__(self, xp, device):
        self.xp = xp
        self.const = {}
        for name, value in (
            ("seed_salt", SEED_SALT),
            ("key_salt", KEY_SALT),
            ("final", FINAL),
            ("m1", _FMIX[0]),
            ("m2", _FMIX[1]),
            *((f"shift{k}", k) for k in (13, 16)),
            *((f"low{k}", 2 ** (32 - k) - 1) for k in (13, 16)),
        ):
            self.const[name] = xp.asarray(_int32(value), dtype=xp.int32, device=device)

    def _shift(self, h, k: int):
        """``h >> k`` as a logical shift of the 32 bits."""
        xp, c = self.xp, self.const
        return xp.bitwise_and(xp.bitwise_right_shift(h, c[f"shift{k}"]), c[f"low{k}"])

    def fmix(self, h):
        """MurmurHash3's 32-bit finaliser."""
        xp, c = self.xp, self.const
        h = xp.bitwise_xor(h, self._shift(h, 16)) * c["m1"]
        h = xp.bitwise_xor(h, self._shift(h, 13)) * c["m2"]
        return xp.bitwise_xor(h, self._shift(h, 16))

    def row_seeds(self, seed, batch_index, head_index):
        """``fmix(fmix(fmix(seed ^ salt) ^ b) ^ h)``, broadcast over the given indices."""
        xp = self.xp
        h = self.fmix(xp.bitwise_xor(seed, self.const["seed_salt"]))
        return self.fmix(xp.bitwise_xor(self.fmix(xp.bitwise_xor(h, batch_index)), head_index))

    def keep(self, backend, row_seeds, query_positions, key_positions, threshold: int):
        """Which probabilities are kept, as ``backend.keep_mask`` says it: kept where
        ``x ^ 2**31 >= threshold`` as unsigned, for ``x`` the hash of each (row, key) pair;
        ``threshold`` is ``ceil(rate * 2**32)``.

        Rows and keys are hashed apart (``[rows, 1]`` and ``[1, keys]``), so a block costs
        an xor and a product (in place where arrays are mutable), and the adapter's mask.
        """
        xp, c = self.xp, self.const
        row = self.fmix(xp.bitwise_xor(row_seeds, query_positions))
        col = self.fmix(xp.bitwise_xor(key_positions, c["key_salt"]))
        x = xp.bitwise_xor(row, col)
        x *= c["final"]
        # x ^ 2**31 as unsigned is in the order of x as signed int32: x is kept iff
        # x >= threshold - 2**31. A threshold out of (0, 2**32) keeps all or nothing.
        if threshold <= 0 or threshold >= 2**32:
            return backend.keep_mask(x * 0, int(threshold > 0))
        return backend.keep_mask(x, threshold - 2**31)


def threshold(rate: float) -> int:
    """The smallest hash value kept at ``rate``: ``ceil(rate * 2**32)``."""
    return math.ceil(rate * 2**32)
