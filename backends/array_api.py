"""The generic adapter: any array-API library that no dedicated adapter claims.

An array is served here when ``array_api_compat.array_namespace`` resolves it, or when it
has ``__array_namespace__``: array-api-strict, Dask (through array-api-compat's wrapper),
CuPy, ndonnx... One :class:`ArrayAPIBackend` exists per namespace, named after its library
(``"array_api_strict"``, ``"dask"``). Everything but the names, dtypes and devices is the
contract's default: Python loops, no autodiff (gradients come from ``uniattn.vjp``), a list
of blocks. A lazy library's conditional always takes the safe branch, so that building a
call's graph computes nothing but the loop bounds that ``query_lengths``, ``key_lengths`` or
``segment_ids`` set.

Importing this module imports array-api-compat and NumPy, and no other array library.
"""

from __future__ import annotations

import importlib
import re
import threading
from typing import Any

import array_api_compat
import numpy as np

from ._base import FLOAT_DTYPES, Backend, Harness

#: The standard's dtypes (and bfloat16), by the names :meth:`Backend.dtype_name` returns.
DTYPE_NAMES = (
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    *FLOAT_DTYPES,
    "complex64",
    "complex128",
)


def library_name(xp: Any) -> str:
    """The name of the library behind namespace ``xp``: its top-level module, and for
    array-api-compat's wrappers the library wrapped (``array_api_compat.dask.array`` is
    ``"dask"``)."""
    parts = getattr(xp, "__name__", type(xp).__module__).split(".")
    return parts[1] if parts[0] == "array_api_compat" and len(parts) > 1 else parts[0]


class ArrayAPIBackend(Backend):
    """The algorithm's adapter for one array-API namespace ``xp``.

    Parameters
    ----------
    xp : module
        The namespace, as ``array_api_compat.array_namespace`` returns it. Its arrays are
        instances of the type of ``xp.zeros`` (more types join :attr:`array_types` as
        :func:`backend_for` meets them).
    """

    def __init__(self, xp: Any):
        self.xp = xp
        #: What the algorithm computes with: ``xp``, or ``xp`` with a library's known
        #: bug worked around (:data:`NAMESPACE_FIXES`).
        self.computes_with = NAMESPACE_FIXES.get(library_name(xp), lambda xp: xp)(xp)
        self.name = library_name(xp)
        self.dtypes = tuple(d for d in FLOAT_DTYPES if _dtype(xp, d) is not None)
        sample = xp.zeros((1,))
        self.array_types: tuple[type, ...] = (type(sample),)
        is_lazy = getattr(array_api_compat, "is_lazy_array", None)  # array-api-compat 1.11
        self.lazy = bool(is_lazy(sample)) if is_lazy else hasattr(sample, "persist")

    def is_array_type(self, tp):
        return issubclass(tp, self.array_types)

    def namespace(self):
        return self.computes_with

    def dtype_name(self, x):
        for name in DTYPE_NAMES:
            dtype = _dtype(self.xp, name)
            if dtype is not None and x.dtype == dtype:
                return name
        return str(x.dtype)

    def device(self, x):
        return array_api_compat.device(x)

    def cond(self, pred, fast, safe, operands):
        # A lazy array's value exists only once its graph is computed: branching on it
        # here would compute the inputs now and again later.
        if self.lazy:
            return safe(*operands)
        return super().cond(pred, fast, safe, operands)


def _dtype(xp: Any, name: str) -> Any:
    return getattr(xp, name, None)


class _OneChunkWhenEmpty:
    """Dask's namespace, with arrays of no elements created as one chunk.

    Dask's automatic chunking (dask 2026.8) divides by zero for some shapes with a
    zero-length axis and one longer than a few elements, e.g. ``zeros((0, 0, 1, 1, 18, 1))``;
    an empty array has only one chunking anyway.
    """

    def __init__(self, xp: Any):
        self._xp = xp
        self.__name__ = xp.__name__

    def __getattr__(self, name: str) -> Any:
        return getattr(self._xp, name)

    def _create(self, name: str, shape: Any, *args: Any, **kwargs: Any) -> Any:
        dims = (shape,) if isinstance(shape, int) else tuple(shape)
        if 0 in dims:
            kwargs.setdefault("chunks", dims)
        return getattr(self._xp, name)(shape, *args, **kwargs)

    def zeros(self, shape, **kwargs):
        return self._create("zeros", shape, **kwargs)

    def ones(self, shape, **kwargs):
        return self._create("ones", shape, **kwargs)

    def empty(self, shape, **kwargs):
        return self._create("empty", shape, **kwargs)

    def full(self, shape, fill_value, **kwargs):
        return self._create("full", shape, fill_value, **kwargs)


#: Library name -> the namespace the algorithm computes with, given the library's own.
NAMESPACE_FIXES = {"dask": _OneChunkWhenEmpty}


class ArrayAPIHarness(Harness):
    """Conversion from and to NumPy for any array-API library: ``xp.asarray`` of a NumPy
    array, and back through DLPack (``np.from_dlpack``), ``np.asarray`` or, for a lazy
    array, its ``compute()``."""

    def version(self):
        module = importlib.import_module(self.name)
        return str(getattr(module, "__version__", "unknown"))

    def asarray(self, a, dtype=None):
        xp = self.namespace()
        if dtype is not None and _dtype(xp, dtype) is None:
            raise ValueError(f"{self.name} has no {dtype}")
        dtype = None if dtype is None else _dtype(xp, dtype)
        return xp.asarray(np.array(a, copy=True), dtype=dtype, device=self.array_device)

    def to_numpy(self, x):
        if self.dtype_name(x) in ("float16", "bfloat16"):
            x = self.namespace().astype(x, self.namespace().float32)
        if hasattr(x, "compute"):  # Dask: the array is a graph
            x = x.compute()
        try:
            return np.array(np.from_dlpack(x), copy=True)
        except (TypeError, AttributeError, BufferError, RuntimeError, ValueError):
            return np.array(x, copy=True)

    def block(self, x):
        """``x`` computed, where its library is lazy (Dask's ``persist``: the result is
        computed and held); tuples and lists element by element."""
        if isinstance(x, (tuple, list)):
            return type(x)(self.block(a) for a in x)
        persist = getattr(x, "persist", None) if self.adapter.lazy else None
        return x if persist is None else persist()

    def devices(self) -> list:
        """The namespace's devices (``__array_namespace_info__().devices()``)."""
        info = getattr(self.namespace(), "__array_namespace_info__", None)
        return list(info().devices()) if info is not None else []

    def find_device(self, name):
        wanted = name.lower()
        devices = self.devices()
        for device in devices:
            if wanted in _labels(device):
                return device
        if wanted == "cpu":
            for device in devices:
                if any("cpu" in label for label in _labels(device)):
                    return device
        known = ", ".join(sorted({min(_labels(d), key=len) for d in devices})) or "none"
        raise ValueError(f"device must be one of {self.name}'s devices ({known}); got {name!r}")

    def platform(self, x):
        # DLPack's device type where the array has one: array-api-strict's devices are
        # all host memory whatever their names.
        dlpack_device = getattr(x, "__dlpack_device__", None)
        if dlpack_device is not None:
            kind = _DLPACK_PLATFORMS.get(int(dlpack_device()[0]))
            if kind is not None:
                return kind
        labels = _labels(self.device(x))
        return "cpu" if any("cpu" in label for label in labels) else min(labels, key=len)


#: DLPack device types (``__dlpack_device__()[0]``) as platform names.
_DLPACK_PLATFORMS = {
    1: "cpu",
    2: "cuda",
    3: "cpu",  # CUDA host memory
    4: "opencl",
    7: "vulkan",
    8: "metal",
    10: "rocm",
    11: "cpu",  # ROCm host memory
    13: "cuda",  # CUDA managed memory
    14: "oneapi",
    15: "webgpu",
}


def _labels(device: Any) -> set[str]:
    """The lower-case names a device goes by: its ``str`` and any quoted name in it
    (``array_api_strict.Device('device1')`` is also ``device1``)."""
    text = str(device).lower()
    return {text, *re.findall(r"'([^']*)'", text)}


#: One adapter per namespace, so that every array of a library dispatches to one object.
_BY_NAMESPACE: dict[Any, ArrayAPIBackend] = {}
_HARNESSES: dict[Any, ArrayAPIHarness] = {}
_LOCK = threading.Lock()


def backend_for(xp: Any, array_type: type | None = None) -> ArrayAPIBackend:
    """The adapter of namespace ``xp``; ``array_type`` is known to be one of its arrays."""
    with _LOCK:
        backend = _BY_NAMESPACE.get(xp)
        if backend is None:
            backend = _BY_NAMESPACE[xp] = ArrayAPIBackend(xp)
        if array_type is not None and not backend.is_array_type(array_type):
            backend.array_types = (*backend.array_types, array_type)
        return backend


def harness_for(xp: Any) -> ArrayAPIHarness:
    """The harness of namespace ``xp``'s adapter."""
    backend = backend_for(xp)
    with _LOCK:
        return _HARNESSES.setdefault(xp, ArrayAPIHarness(backend))


def namespace_of(x: Any) -> Any | None:
    """The array-API namespace of ``x``, or None where neither array-api-compat nor the
    object itself (``__array_namespace__``) names one."""
    try:
        return array_api_compat.array_namespace(x)
    except TypeError:
        pass
    method = getattr(x, "__array_namespace__", None)
    if method is None:
        return None
    try:
        return method()
    except Exception:
        return None


def namespace_named(name: str) -> Any:
    """The namespace of the library called ``name``: array-api-compat's wrapper where it
    has one (``"dask"``: ``array_api_compat.dask.array``), else the module ``name`` if it
    is an array-API namespace itself (``"array_api_strict"``).

    Raises
    ------
    ImportError
        The library is not installed.
    ValueError
        The module is no array-API namespace.
    """
    for wrapper in (f"array_api_compat.{name}.array", f"array_api_compat.{name}"):
        try:
            module = importlib.import_module(wrapper)
        except ModuleNotFoundError as e:
            if e.name is not None and not wrapper.startswith(e.name):
                raise  # the wrapper exists but its library does not
            continue
        if hasattr(module, "asarray"):
            return module
    module = importlib.import_module(name)
    if not hasattr(module, "__array_namespace_info__"):
        raise ValueError(f"{name} is not an array-API namespace")
    return module
