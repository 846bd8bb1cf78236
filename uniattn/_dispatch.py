"""Find the backend of a call from its arrays' types.

A type is only compared with frameworks already in ``sys.modules`` (einops and
array-api-compat do the same), so detection never imports a framework. The answer is
cached per type: an array of framework X can only exist once X is imported.
"""

from __future__ import annotations

import sys
from typing import Any

from . import backends
from ._cache import memoized
from .backends import Backend


@memoized()
def backend_of_type(tp: type) -> Backend | None:
    """The backend whose arrays are instances of ``tp``, or None."""
    present = [name for name, module in backends.REGISTRY.items() if module in sys.modules]
    # Adapters already imported are asked first, so that a caller under torch.compile
    # that imported its adapter never imports another one here (a graph break).
    for name in [n for n in present if backends.loaded(n)] + present:
        backend = backends.load(name)
        if backend.is_array_type(tp):
            return backend
    return None


def type_name(x: Any) -> str:
    tp = type(x)
    return tp.__qualname__ if tp.__module__ == "builtins" else f"{tp.__module__}.{tp.__qualname__}"


def backend_of(**arrays: Any) -> Backend:
    """The one backend of all non-None ``arrays`` (keyword = argument name).

    Raises
    ------
    TypeError
        If an argument is not an array of a supported framework, or if the arrays come
        from different frameworks.
    """
    found: dict[str, Backend] = {}
    for name, x in arrays.items():
        if x is None:
            continue
        backend = backend_of_type(type(x))
        if backend is None:
            supported = ", ".join(backends.REGISTRY)
            raise TypeError(
                f"{name} must be an array of one of the supported frameworks ({supported}); "
                f"got {type_name(x)}"
            )
        found[name] = backend
    first_name, first = next(iter(found.items()))
    for name, backend in found.items():
        if backend is not first:
            raise TypeError(
                f"all arrays must come from one framework: {first_name} is a {first.name} array "
                f"({type_name(arrays[first_name])}) but {name} is a {backend.name} array "
                f"({type_name(arrays[name])})"
            )
    return first
