"""Run a case through a backend and through the float64 reference."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import uniattn
from uniattn import reference

from .cases import Case, make_inputs

DIFFERENTIABLE = ("query", "key", "value", "bias")


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
        return tuple(self.arrays[n] for n in DIFFERENTIABLE if self.arrays[n] is not None)

    def call(self, *primals, **overrides):
        """``uniattn.attention`` on this case (primals replace query, key, value[, bias])."""
        arrays = dict(self.arrays)
        for name, x in zip(DIFFERENTIABLE, primals, strict=False):  # bias is optional
            arrays[name] = x
        kwargs = {**self.case.kwargs(), **overrides}
        return uniattn.attention(
            arrays["query"],
            arrays["key"],
            arrays["value"],
            bias=arrays["bias"],
            mask=arrays["mask"],
            **kwargs,
        )

    def reference_output(self):
        r = self.rounded
        return reference.attention(
            r["query"],
            r["key"],
            r["value"],
            bias=r["bias"],
            mask=r["mask"],
            **_reference_kwargs(self.case),
        )

    def reference_gradients(self) -> dict:
        r = self.rounded
        g = reference.vjp(
            r["query"],
            r["key"],
            r["value"],
            r["d_out"],
            bias=r["bias"],
            mask=r["mask"],
            **_reference_kwargs(self.case),
        )
        grads = {"query": g.dq, "key": g.dk, "value": g.dv, "bias": g.d_bias}
        return {n: grads[n] for n in DIFFERENTIABLE if self.arrays[n] is not None}

    def gradients(self, **overrides) -> dict:
        """Gradients by the backend's autodiff, as float64 NumPy arrays."""
        _out, vjp_fn = self.backend.vjp(lambda *p: self.call(*p, **overrides), *self.primals())
        return self._named(vjp_fn(self.arrays["d_out"]))

    def vjp_gradients(self) -> dict:
        """Gradients from ``uniattn.vjp`` (uniattn's own backward, every backend)."""
        a = self.arrays
        _out, vjp_fn = uniattn.vjp(
            a["query"], a["key"], a["value"], bias=a["bias"], mask=a["mask"], **self.case.kwargs()
        )
        return self._named(vjp_fn(a["d_out"]))

    def _named(self, grads) -> dict:
        names = [n for n in DIFFERENTIABLE if self.arrays[n] is not None]
        grads = {n: g for n, g in zip(names, grads, strict=True)}
        for n, g in grads.items():
            assert self.backend.dtype_name(g) == self.backend.dtype_name(self.arrays[n]), n
        return {n: self.backend.to_numpy(g) for n, g in grads.items()}


def prepare(backend, case: Case, dtype: str) -> Prepared:
    arrays, rounded = {}, {}
    for name, a in make_inputs(case).items():
        if a is None:
            arrays[name] = rounded[name] = None
        elif a.dtype == bool:
            arrays[name] = backend.asarray(a)
            rounded[name] = a
        else:
            arrays[name] = backend.asarray(a, dtype)
            rounded[name] = backend.to_numpy(arrays[name]).astype(np.float64)
    return Prepared(case, backend, dtype, arrays, rounded)


def _reference_kwargs(case: Case) -> dict:
    return dict(causal=case.causal, scale=case.scale, layout=case.layout)
