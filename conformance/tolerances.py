"""Per-dtype tolerances: the one table every conformance comparison uses.

An error is ``max|actual - expected| / max|expected|`` (a max-norm relative error, so
entries near zero are judged against the array's scale; gradients against the largest
gradient of the call, see :func:`gradient_scale`). ``expected`` is the float64
reference evaluated on the inputs *after* rounding them to the dtype under test, so the
budget covers the computation only: accumulation in float32 (float64 for float64
inputs) plus the final rounding of the result to the input dtype (half an ulp: 2.4e-4
for float16, 2.0e-3 for bfloat16).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    forward: float
    gradient: float


TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(forward=1e-12, gradient=1e-11),
    "float32": Tolerance(forward=1e-5, gradient=5e-5),
    "float16": Tolerance(forward=2e-3, gradient=4e-3),
    "bfloat16": Tolerance(forward=1.6e-2, gradient=3e-2),
}


def relative_error(actual, expected, scale: float | None = None) -> float:
    """``max|actual - expected|`` over ``scale`` (default: ``max|expected|``)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {actual.shape} != expected {expected.shape}")
    if expected.size == 0:
        return 0.0
    if not np.all(np.isfinite(actual)):
        return float("inf")
    if scale is None:
        scale = float(np.max(np.abs(expected)))
    scale = max(scale, np.finfo(np.float64).tiny)
    return float(np.max(np.abs(actual - expected))) / scale


def gradient_scale(gradients) -> float:
    """The scale gradient errors are judged against: the largest entry of any of them.

    A gradient can be exactly zero (a bias constant along the keys; a single key), where
    an error relative to itself is meaningless; the call's other gradients set its scale.
    """
    return max(float(np.max(np.abs(g), initial=0.0)) for g in gradients)


def assert_close(
    actual,
    expected,
    dtype: str,
    *,
    what: str,
    kind: str = "forward",
    scale: float | None = None,
    repro: str = "",
):
    """Assert that ``actual`` matches ``expected`` within ``TOLERANCES[dtype]``."""
    tol = getattr(TOLERANCES[dtype], kind)
    err = relative_error(actual, expected, scale)
    if not err <= tol:
        raise AssertionError(
            f"{what}: relative error {err:.3g} exceeds the {dtype} {kind} tolerance {tol:g}"
            + (f"\n{repro}" if repro else "")
        )


def assert_gradients_close(actual: dict, expected: dict, dtype: str, *, what: str, repro: str = ""):
    """Assert each named gradient matches, judged against the largest expected gradient."""
    assert actual.keys() == expected.keys(), (sorted(actual), sorted(expected))
    scale = gradient_scale(expected.values())
    for name in expected:
        assert_close(
            actual[name],
            expected[name],
            dtype,
            kind="gradient",
            scale=scale,
            what=f"d_{name} ({what})",
            repro=repro,
        )
