"""NumPy adapter: Python loops, no autodiff (gradients come from ``uniattn.vjp``)."""

from __future__ import annotations

import array_api_compat.numpy as xp
import numpy as np

from ._base import LOG2_E, Backend, Harness


class NumPyBackend(Backend):
    name = "numpy"
    dtypes = ("float16", "float32", "float64")  # NumPy has no bfloat16
    default_chunks = (512, 512)
    decode_key_chunk = 1024

    def is_array_type(self, tp):
        return issubclass(tp, np.ndarray)

    def namespace(self):
        return xp

    def concrete_ints(self, x):
        return x.tolist()

    def exp_shifted(self, s, shift):
        # In place (s is a temporary) and as exp2, about half the time of exp; the shift
        # comes first, so that s - shift is exact near the row maximum.
        s -= shift
        s *= LOG2_E
        return np.exp2(s, out=s)

    def row_sums(self, p):
        # A product with a column of ones runs on every core (BLAS); np.sum on one.
        return p @ np.ones((p.shape[-1], 1), dtype=p.dtype)


class NumPyHarness(Harness):
    def version(self):
        return np.__version__

    def asarray(self, a, dtype=None):
        return np.array(a, dtype=dtype, copy=True)

    def to_numpy(self, x):
        return np.array(x, copy=True)


backend = NumPyBackend()
harness = NumPyHarness(backend)
