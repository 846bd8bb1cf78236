"""Forward results and gradients of every case against the float64 reference."""

from __future__ import annotations

import pytest

from .harness import prepare
from .tolerances import assert_close, gradient_scale


def test_forward(backend, case, dtype):
    p = prepare(backend, case, dtype)
    out = p.call(*p.primals())
    assert backend.dtype_name(out) == dtype, p.repro
    assert type(out) is type(p.arrays["query"]) or backend.is_array_type(type(out)), p.repro
    assert_close(backend.to_numpy(out), p.reference_output(), dtype, what="output", repro=p.repro)


def _check_gradients(p, actual, expected, how):
    assert actual.keys() == expected.keys()
    scale = gradient_scale(expected.values())
    for name in expected:
        assert_close(
            actual[name],
            expected[name],
            p.dtype,
            kind="gradient",
            scale=scale,
            what=f"d_{name} ({how})",
            repro=p.repro,
        )


def test_gradients_vjp(backend, case, dtype):
    """uniattn.vjp: uniattn's own backward, on every backend (NumPy's only gradients)."""
    p = prepare(backend, case, dtype)
    _check_gradients(p, p.vjp_gradients(), p.reference_gradients(), "uniattn.vjp")


@pytest.mark.needs_autodiff
def test_gradients_framework(backend, case, dtype):
    """The framework's autodiff with backward="custom" (the registered hook) and with
    backward="autodiff" (through the rematerialised loops): each against the reference
    and against each other."""
    p = prepare(backend, case, dtype)
    expected = p.reference_gradients()
    custom = p.gradients(backward="custom")
    autodiff = p.gradients(backward="autodiff")
    _check_gradients(p, custom, expected, "backward='custom'")
    _check_gradients(p, autodiff, expected, "backward='autodiff'")
    _check_gradients(p, custom, autodiff, "'custom' against 'autodiff'")
