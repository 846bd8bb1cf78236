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


@pytest.mark.needs_autodiff
def test_gradients_autodiff(backend, case, dtype):
    p = prepare(backend, case, dtype)
    expected = p.reference_gradients()
    actual = p.gradients(backward="autodiff")
    assert actual.keys() == expected.keys()
    scale = gradient_scale(expected.values())
    for name in expected:
        assert_close(
            actual[name],
            expected[name],
            dtype,
            kind="gradient",
            scale=scale,
            what=f"d_{name} (backward='autodiff')",
            repro=p.repro,
        )
