"""``implementation="fused"``: the framework's fused kernel over the case table, on the
backends that have one on the inputs' device (torch's SDPA on the CPU and CUDA, JAX's cuDNN
attention on NVIDIA GPUs), in float32 and float64 on the CPU and every dtype on an
accelerator. A case the kernel computes gives the reference's output and gradients, and
the default implementation picks the kernel; a case it cannot compute raises a ValueError
naming the reason, and the default falls back to the chunked algorithm."""

from __future__ import annotations

import numpy as np
import pytest

from .harness import FUSED_REFUSAL, prepare
from .tolerances import assert_close, assert_gradients_close

pytestmark = pytest.mark.needs_fused


def _fused(fn):
    """``fn()``, or the reason the fused kernel gives for refusing the call."""
    try:
        return fn()
    except ValueError as e:
        assert str(e).startswith(FUSED_REFUSAL), e
        reason = str(e).removeprefix(FUSED_REFUSAL)
        assert reason, "a refusal names its reason"
        return reason


def test_fused_forward(backend, case, dtype):
    p = prepare(backend, case, dtype)
    fused = _fused(lambda: p.call(*p.primals(), implementation="fused"))
    default = backend.to_numpy(p.call(*p.primals(), implementation=None))
    if isinstance(fused, str):  # the default is the chunked algorithm, bit for bit
        chunked = backend.to_numpy(p.call(*p.primals(), implementation="chunked"))
        np.testing.assert_array_equal(default, chunked, err_msg=fused)
        return
    fused = backend.to_numpy(fused)
    assert_close(fused, p.reference_output(), dtype, what="fused output", repro=p.repro)
    np.testing.assert_array_equal(default, fused)  # the default takes the kernel


def test_fused_gradients(backend, case, dtype):
    """``uniattn.vjp`` and the framework's autodiff of ``attention``, both through the fused
    kernel where it computes the call's gradients (a bias gradient, for one, it may not)."""
    p = prepare(backend, case, dtype)
    expected = p.reference_gradients()
    for name, grads in (
        ("uniattn.vjp", lambda: p.vjp_gradients(implementation="fused")),
        ("autodiff", lambda: p.gradients(implementation="fused")),
    ):
        got = _fused(grads)
        if not isinstance(got, str):
            assert_gradients_close(got, expected, dtype, what=f"fused, {name}", repro=p.repro)
