"""NumPy adapter: a Python loop, no autodiff (gradients come from ``uniattn.vjp``)."""

from __future__ import annotations

import array_api_compat.numpy as xp
import numpy as np

from . import LOG2_E, Backend, python_fori, python_scan


class NumPyBackend(Backend):
    name = "numpy"
    dtypes = ("float16", "float32", "float64")  # NumPy has no bfloat16
    has_autodiff = False
    # Decoding: key chunk from `bench masks`-style sweeps at a 32k cache (README, tuning).
    decode_key_chunk = 1024
    # From `python -m uniattn.bench tune` on the project's 2-core CPU (README, tuning).
    default_chunks = (512, 512)

    def exp_shifted(self, s, shift):
        # In place (s is a fresh temporary, see Backend.exp_shifted) and as exp2, as in the
        # torch adapter: on an 8 x 512 x 512 block exp2 takes 0.39 ms, exp 0.67, the
        # scaling pass 0.09 (AVX-512 host). The shift comes first, so that s - shift is
        # exact near the row maximum, where the weights that matter are.
        s -= shift
        s *= LOG2_E
        return np.exp2(s, out=s)

    def row_sums(self, p):
        # A product with a column of ones: BLAS runs it on every core, NumPy's reductions
        # on one (8 x 512 x 512 block: 0.09 ms against np.sum's 0.32).
        return p @ np.ones((p.shape[-1], 1), dtype=p.dtype)

    def is_array_type(self, tp):
        return issubclass(tp, np.ndarray)

    def namespace(self):
        return xp

    def version(self):
        return np.__version__

    def scan(self, step, init, xs, length):
        return python_scan(step, init, xs, length, np.stack)

    def fori_loop(self, lower, upper, body, init, max_trips):
        return python_fori(lower, upper, body, init)

    def add_at(self, x, start, update, axis):
        start = int(start)
        x[(slice(None),) * (axis % x.ndim) + (slice(start, start + update.shape[axis]),)] += update
        return x

    def custom_vjp(self, fwd, bwd):
        return lambda *args: fwd(*args)[0]

    def asarray(self, a, dtype=None):
        return np.array(a, dtype=dtype, copy=True)

    def to_numpy(self, x):
        return np.array(x, copy=True)


backend = NumPyBackend()
