"""Framework adapters, installed as ``uniattn.backends``.

Each dedicated adapter is one module here that defines ``backend``, an instance of a
:class:`Backend` subclass (what the algorithm needs), and ``harness``, an instance of a
:class:`Harness` subclass (what tests, benchmarks and the CLI need). A new framework is
one such file plus its line in :data:`REGISTRY`, or a module of another package registered
under the entry-point group ``uniattn.backends`` (:data:`ENTRY_POINT_GROUP`); the
conformance suite then runs against it unchanged (``docs/backends.md``). Arrays of any
other array-API library run through the generic adapter (:mod:`.array_api`).

An adapter module imports its framework, but it is only imported once that framework is
already in ``sys.modules`` (``uniattn._dispatch``): importing uniattn imports no framework.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

from ._base import FLOAT_DTYPES, Backend, Harness, python_fori, python_scan

__all__ = [
    "ARRAY_API_LIBRARIES",
    "ENTRY_POINT_GROUP",
    "FLOAT_DTYPES",
    "REGISTRY",
    "Backend",
    "Harness",
    "available",
    "entry_points",
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


#: Array-API libraries with no dedicated adapter that the conformance suite runs on by
#: default when installed (name -> top-level module): the generic adapter serves them, as it
#: serves any library ``array_api_compat.array_namespace`` resolves.
ARRAY_API_LIBRARIES: dict[str, str] = {
    "array_api_strict": "array_api_strict",
    "dask": "dask",
}

#: Entry-point group of the backends other packages register, ``NAME = "module:backend"``:
#: NAME is also the top-level module of the framework the backend serves, and ``module``
#: defines ``backend`` and ``harness``, as a module here does.
ENTRY_POINT_GROUP = "uniattn.backends"

_entry_points: dict | None = None


def entry_points() -> dict:
    """The backends other packages register, name -> ``importlib.metadata.EntryPoint``,
    read from the installed distributions' metadata once (imports none of them). A name
    that a dedicated adapter has is left out: the dedicated adapter serves it."""
    global _entry_points
    if _entry_points is None:
        from importlib.metadata import entry_points as installed_entry_points

        found: dict = {}
        for point in installed_entry_points(group=ENTRY_POINT_GROUP):
            if point.name not in REGISTRY:
                found.setdefault(point.name, point)
        _entry_points = found
    return _entry_points


def _known() -> list[str]:
    return [*REGISTRY, *ARRAY_API_LIBRARIES, *entry_points()]


def _module(name: str):
    """The adapter module of a dedicated or registered backend; None for another name."""
    if name in REGISTRY:
        # An adapter already imported is looked up, not imported again: torch.compile
        # traces a dict lookup but not importlib, which would break its graph.
        if loaded(name):
            return sys.modules[f"{__name__}.{name}"]
        return importlib.import_module(f"{__name__}.{name}")
    point = entry_points().get(name)
    return None if point is None else importlib.import_module(point.module)


def _generic(name: str):
    """The generic adapter's harness for the array-API library called ``name``."""
    from . import array_api

    try:
        return array_api.harness_for(array_api.namespace_named(name))
    except (ImportError, ValueError):
        raise ValueError(
            f"backend must be one of {_known()} or the name of an installed array-API "
            f"library; got {name!r}"
        ) from None


def load(name: str) -> Backend:
    """The adapter called ``name`` (this imports its framework): a dedicated adapter, a
    registered one (:data:`ENTRY_POINT_GROUP`), or the generic adapter of the array-API
    library called ``name``."""
    module = _module(name)
    if module is None:
        return _generic(name).adapter
    if name in REGISTRY:
        return module.backend
    return entry_points()[name].load()


def harness(name: str) -> Harness:
    """The harness of the adapter called ``name`` (as :func:`load` finds it): what tests,
    benchmarks and the CLI use (conversion to and from NumPy, autodiff, compilation,
    timing, memory)."""
    module = _module(name)
    return _generic(name) if module is None else module.harness


def loaded(name: str) -> bool:
    """Whether the adapter called ``name`` is imported."""
    if name in REGISTRY:
        return f"{__name__}.{name}" in sys.modules
    point = entry_points().get(name)
    return point is not None and point.module in sys.modules


def installed() -> list[str]:
    """Names of the dedicated adapters whose framework can be imported (imports nothing)."""
    return [name for name, module in REGISTRY.items() if importlib.util.find_spec(module)]


def available() -> list[str]:
    """Names of every backend that can be loaded here (imports nothing): the dedicated
    adapters whose framework is installed, the installed :data:`ARRAY_API_LIBRARIES`, and
    the backends other packages register."""
    libraries = [n for n, module in ARRAY_API_LIBRARIES.items() if importlib.util.find_spec(module)]
    return [*installed(), *libraries, *(n for n in entry_points() if n not in libraries)]
