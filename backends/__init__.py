"""Framework adapters, installed as ``uniattn.backends``.

Each adapter is one module here that defines ``backend``, an instance of a
:class:`Backend` subclass (what the algorithm needs), and ``harness``, an instance of a
:class:`Harness` subclass (what tests, benchmarks and the CLI need). A new framework is
one such file plus its line in :data:`REGISTRY`; the conformance suite then runs against
it unchanged (``docs/backends.md``).

An adapter module imports its framework, but it is only imported once that framework is
already in ``sys.modules`` (``uniattn._dispatch``): importing uniattn imports no framework.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

from ._base import FLOAT_DTYPES, Backend, Harness, python_fori, python_scan

__all__ = [
    "FLOAT_DTYPES",
    "REGISTRY",
    "Backend",
    "Harness",
    "harness",
    "installed",
    "load",
    "loaded",
    "python_fori",
    "python_scan",
]

#: Backend name -> the top-level module of its framework. The name is also the adapter
#: module's name in this package. Order is the order of detection and of the test matrix.
REGISTRY: dict[str, str] = {
    "numpy": "numpy",
    "jax": "jax",
    "torch": "torch",
    "tensorflow": "tensorflow",
}


def _module(name: str):
    if name not in REGISTRY:
        raise ValueError(f"backend must be one of {sorted(REGISTRY)}; got {name!r}")
    # An adapter already imported is looked up, not imported again: torch.compile traces
    # a dict lookup but not importlib, which would break its graph.
    if loaded(name):
        return sys.modules[f"{__name__}.{name}"]
    return importlib.import_module(f"{__name__}.{name}")


def load(name: str) -> Backend:
    """The adapter called ``name`` (this imports its framework)."""
    return _module(name).backend


def harness(name: str) -> Harness:
    """The harness of the adapter called ``name``: what tests, benchmarks and the CLI use
    (conversion to and from NumPy, autodiff, compilation, timing, memory)."""
    return _module(name).harness


def loaded(name: str) -> bool:
    """Whether the adapter called ``name`` is imported."""
    return f"{__name__}.{name}" in sys.modules


def installed() -> list[str]:
    """Names of the backends whose framework can be imported (imports nothing)."""
    return [name for name, module in REGISTRY.items() if importlib.util.find_spec(module)]
