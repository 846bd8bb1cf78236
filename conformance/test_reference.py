"""Forward results and gradients of every case against the float64 reference."""

from __future__ import annotations

import pytest

from .harness import prepare
from .tolerances import assert_close, assert_gradients_close


def test_forward(backend, case, dtype):
    p = prepare(backend, case, dtype)
    out = p.call(*p.primals())
    assert backend.dtype_name(out) == dtype, p.repro
    assert type(out) is type(p.arrays["query"]) or backend.is_array_type(type(out)), p.repro
    assert_close(backend.to_numpy(out), p.reference_output(), dtype, what="output", repro=p.repro)


def test_gradients_vjp(backend, case, dtype):
    """uniattn.vjp: uniattn's own backward, on every backend (NumPy's only gradients)."""
    p = prepare(backend, case, dtype)
    assert_gradients_close(
        p.vjp_gradients(), p.reference_gradients(), dtype, what="uniattn.vjp", repro=p.repro
    )


@pytest.mark.needs_autodiff
def test_gradients_custom(backend, case, dtype):
    """The framework's autodiff with backward="custom" (the registered hook)."""
    p = prepare(backend, case, dtype)
    custom = p.gradients(backward="custom")
    assert_gradients_close(
        custom, p.reference_gradients(), dtype, what="backward='custom'", repro=p.repro
    )


@pytest.mark.needs_autodiff
def test_gradients_autodiff(backend, case, dtype):
    """The framework's autodiff with backward="autodiff" (through the rematerialised loops):
    against the reference and against backward="custom"."""
    p = prepare(backend, case, dtype)
    autodiff = p.gradients(backward="autodiff")
    what = "backward='autodiff'"
    assert_gradients_close(autodiff, p.reference_gradients(), dtype, what=what, repro=p.repro)
    custom = p.gradients(backward="custom")
    assert_gradients_close(custom, autodiff, dtype, what="'custom' vs 'autodiff'", repro=p.repro)
