"""Find the backend of a call from its arrays' types.

Three kinds of adapter are asked in turn:

1. the dedicated adapters (:data:`uniattn.backends.REGISTRY`), for frameworks already in
   ``sys.modules`` (einops and array-api-compat do the same), so detection never imports a
   framework;
2. the backends other packages register under the entry-point group ``uniattn.backends``,
   read only once an array of a type no dedicated adapter claims arrives, and each
   imported only if the framework it is named after is in ``sys.modules``;
3. the generic adapter (:mod:`uniattn.backends.array_api`), for any array whose namespace
   ``array_api_compat.array_namespace`` (or the array's ``__array_namespace__``) names.

The answer is cached per type: an array of framework X can only exist once X is imported.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from . import backends
from ._cache import memoized
from .backends import Backend


@memoized()
def backend_of_type(tp: type) -> Backend | None:
    """The dedicated or registered backend whose arrays are instances of ``tp``, or None."""
    present = [name for name, module in backends.REGISTRY.items() if module in sys.modules]
    # Adapters already imported are asked first, so that a caller under torch.compile
    # that imported its adapter never imports another one here (a graph break).
    for name in [n for n in present if backends.loaded(n)] + present:
        backend = backends.load(name)
        if backend.is_array_type(tp):
            return backend
    for name in backends.entry_points():
        if name in sys.modules:  # its framework is imported: its adapter may be
            backend = backends.load(name)
            if backend.is_array_type(tp):
                return backend
    return None


_GENERIC: dict[type, Backend | None] = {}
_GENERIC_LOCK = threading.Lock()


def generic_backend_of(x: Any) -> Backend | None:
    """The generic adapter of ``x``'s array-API namespace (cached per type), or None.

    A namespace that a dedicated adapter serves (NumPy's, of a NumPy scalar) is not one:
    those arrays are the dedicated adapter's, and anything else of theirs is no array.
    """
    tp = type(x)
    if tp in _GENERIC:
        return _GENERIC[tp]
    from .backends import array_api

    xp = array_api.namespace_of(x)
    found = None
    if xp is not None and array_api.library_name(xp) not in backends.REGISTRY:
        found = array_api.backend_for(xp, tp)
    with _GENERIC_LOCK:
        return _GENERIC.setdefault(tp, found)


def array_backend_of(x: Any) -> Backend | None:
    """The backend of array ``x``: dedicated, registered or generic; None if none."""
    return backend_of_type(type(x)) or generic_backend_of(x)


def type_name(x: Any) -> str:
    tp = type(x)
    return tp.__qualname__ if tp.__module__ == "builtins" else f"{tp.__module__}.{tp.__qualname__}"


def supported() -> str:
    """What an array may be, for error messages."""
    registered = ", ".join(backends.entry_points())
    return (
        f"{', '.join(backends.REGISTRY)}; any array-API library that array_api_compat."
        f"array_namespace resolves or whose arrays have __array_namespace__ (e.g. "
        f"{', '.join(backends.ARRAY_API_LIBRARIES)})"
        + (f"; registered backends: {registered}" if registered else "")
    )


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
        backend = array_backend_of(x)
        if backend is None:
            raise TypeError(
                f"{name} must be an array of a supported library ({supported()}); got "
                f"{type_name(x)}. Another library needs a backend: see 'Adding a backend' "
                f"in docs/backends.md (a package registers one under the entry-point group "
                f"'{backends.ENTRY_POINT_GROUP}')"
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
