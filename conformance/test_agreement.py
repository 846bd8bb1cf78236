"""The same inputs through every selected backend give the same results."""

from __future__ import annotations

import itertools

import pytest

from uniattn import backends

from .cases import CASES
from .harness import prepare
from .tolerances import assert_close, assert_gradients_close

AGREEMENT_CASES = [
    "non-divisible",
    "causal-q-longer",
    "mask-and-bias-causal",
    "gqa-mask-bhtd",
    "decode",
    "packed-padding-gqa",
    "everything",
]


@pytest.fixture(scope="module")
def selected(request):
    chosen = [backends.harness(n) for n in request.config.uniattn_backends]
    if len(chosen) < 2:
        pytest.skip("agreement needs at least two backends (select more with --backend)")
    return chosen


@pytest.mark.parametrize("name", AGREEMENT_CASES)
# float32, what models run. In float64 each backend is within its tolerance of the
# reference (test_reference.py), so any two are within twice that of each other.
@pytest.mark.parametrize("dtype", ["float32"])
def test_backends_agree_forward(selected, name, dtype):
    outs = {}
    for b in selected:
        p = prepare(b, CASES[name], dtype)
        outs[b.name] = b.to_numpy(p.call(*p.primals()))
    for (a, x), (b, y) in itertools.combinations(outs.items(), 2):
        assert_close(x, y, dtype, what=f"{a} vs {b} output on {name!r}")


@pytest.mark.parametrize("name", AGREEMENT_CASES)
def test_backends_agree_gradients(selected, name):
    grads = {}
    for b in selected:
        if b.has_autodiff:
            grads[b.name] = prepare(b, CASES[name], "float32").gradients()
    for (a, x), (b, y) in itertools.combinations(grads.items(), 2):
        assert_gradients_close(y, x, "float32", what=f"{a} vs {b} on {name!r}")
