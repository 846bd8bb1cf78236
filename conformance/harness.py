"""Run a case through a backend and through the float64 reference."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import array_api_compat.numpy
import numpy as np
import pytest

import uniattn
from uniattn import reference

from .cases import CALLABLES, Case, make_inputs

DIFFERENTIABLE = ("query", "key", "value", "bias", "sinks")
OTHERS = ("mask", "query_lengths", "key_lengths", "segment_ids")
#: The ``implementation`` the case table's calls ask for (``--implementation``).
IMPLEMENTATION: str | None = "chunked"
FUSED_REFUSAL = "implementation='fused': "


@contextlib.contextmanager
def fused_or_skip():
    """Skip the test, with the reason, where the fused kernel cannot compute a call of it
    (``--implementation=fused``)."""
    try:
        yield
    except ValueError as e:
        if not str(e).startswith(FUSED_REFUSAL):
            raise
        pytest.skip(f"fused: {str(e).removeprefix(FUSED_REFUSAL)}")


@dataclass
class Prepared:
    """A case's inputs on one backend, and the same values (rounded to ``dtype``) in NumPy."""

    case: Case
    backend: object
    dtype: str
    arrays: dict  # backend arrays (None where absent)
    rounded: dict  # float64 NumPy arrays holding exactly the backend's values

    @property
    def repro(self) -> str:
        return self.case.repro(self.backend.name, self.dtype)

    def primals(self) -> tuple:
        return tuple(self.arrays[n] for n in self._differentiable())

    def _differentiable(self) -> list[str]:
        """The names of the array arguments (a callable bias is not one)."""
        return [n for n in DIFFERENTIABLE if _is_array(self.arrays[n])]

    def call(self, *primals, **overrides):
        """``uniattn.attention`` on this case (primals replace query, key, value and the
        differentiable operands given: bias, sinks)."""
        arrays = dict(self.arrays)
        for name, x in zip(self._differentiable(), primals, strict=False):
            arrays[name] = x
        kwargs = {**self.case.kwargs(), **self.others(), **overrides}
        q, k, v = arrays["query"], arrays["key"], arrays["value"]
        if "implementation" in overrides:  # the test's own: a refusal is its business
            return uniattn.attention(q, k, v, bias=arrays["bias"], sinks=arrays["sinks"], **kwargs)
        with fused_or_skip():
            return uniattn.attention(
                q,
                k,
                v,
                bias=arrays["bias"],
                sinks=arrays["sinks"],
                implementation=IMPLEMENTATION,
                **kwargs,
            )

    def others(self, source=None) -> dict:
        """The non-differentiable array arguments: mask, lengths, segment ids."""
        source = self.arrays if source is None else source
        q_ids, kv_ids = source["q_segment_ids"], source["kv_segment_ids"]
        source = {**source, "segment_ids": q_ids if kv_ids is q_ids else (q_ids, kv_ids)}
        return {n: source[n] for n in OTHERS}

    def reference_output(self):
        r = self.rounded
        return reference.attention(
            r["query"],
            r["key"],
            r["value"],
            bias=r["bias"],
            sinks=r["sinks"],
            **self.reference_kwargs(),
        )

    def reference_gradients(self) -> dict:
        r = self.rounded
        g = reference.vjp(
            r["query"],
            r["key"],
            r["value"],
            r["d_out"],
            bias=r["bias"],
            sinks=r["sinks"],
            **self.reference_kwargs(),
        )
        grads = {"query": g.dq, "key": g.dk, "value": g.dv, "bias": g.d_bias, "sinks": g.d_sinks}
        return {n: grads[n] for n in self._differentiable()}

    def reference_kwargs(self) -> dict:
        """The semantic keyword arguments of :mod:`uniattn.reference` (bias and sinks
        excluded)."""
        return {**self.case.semantics(), **self.others(self.rounded)}

    def gradients(self, **overrides) -> dict:
        """Gradients by the backend's autodiff, as float64 NumPy arrays."""
        _out, vjp_fn = self.backend.vjp(lambda *p: self.call(*p, **overrides), *self.primals())
        return self._named(vjp_fn(self.arrays["d_out"]))

    def vjp_gradients(self, **overrides) -> dict:
        """Gradients from ``uniattn.vjp`` (uniattn's own backward, every backend; the
        framework's autodiff of its fused kernel with ``implementation="fused"``)."""
        a = self.arrays
        kwargs = {**self.case.kwargs(), **self.others(), **overrides}
        skipping = (
            fused_or_skip() if "implementation" not in overrides else contextlib.nullcontext()
        )
        kwargs.setdefault("implementation", IMPLEMENTATION)
        with skipping:
            _out, vjp_fn = uniattn.vjp(
                a["query"], a["key"], a["value"], bias=a["bias"], sinks=a["sinks"], **kwargs
            )
        return self._named(vjp_fn(a["d_out"]))

    def _named(self, grads) -> dict:
        names = self._differentiable()
        grads = {n: g for n, g in zip(names, grads, strict=True)}
        for n, g in grads.items():
            assert self.backend.dtype_name(g) == self.backend.dtype_name(self.arrays[n]), n
        return {n: self.backend.to_numpy(g) for n, g in grads.items()}


def prepare(backend, case: Case, dtype: str) -> Prepared:
    arrays, rounded = {}, {}
    for name, a in make_inputs(case).items():
        if a is None:
            arrays[name] = rounded[name] = None
        elif a.dtype.kind in "bi":  # masks, lengths and segment ids
            arrays[name] = backend.asarray(a)
            rounded[name] = a
        else:
            arrays[name] = backend.asarray(a, dtype)
            rounded[name] = backend.to_numpy(arrays[name]).astype(np.float64)
    # Callables compute in float32 (float64 for float64 cases), like the scores.
    fn_dtype = "float64" if dtype == "float64" else "float32"
    for name in ("bias", "mask"):
        factory = getattr(case, f"{name}_fn")
        if factory is not None:
            xp = backend.namespace()
            arrays[name] = CALLABLES[factory](
                xp, case.heads, getattr(xp, fn_dtype), device=backend.array_device
            )
            rounded[name] = CALLABLES[factory](array_api_compat.numpy, case.heads, np.float64)
    return Prepared(case, backend, dtype, arrays, rounded)


def _is_array(x) -> bool:
    return x is not None and not callable(x)
