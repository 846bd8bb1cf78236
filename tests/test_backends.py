"""Detection and the adapters' namespaces."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import numpy as np
import pytest

import uniattn
from uniattn import _chunked, backends
from uniattn._dispatch import backend_of, backend_of_type


def _names_used_by_the_algorithm() -> set[str]:
    tree = ast.parse(Path(_chunked.__file__).read_text())
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "xp"
    }


def test_algorithm_module_names_no_framework():
    source = Path(_chunked.__file__).read_text()
    for framework in ("numpy", "jax", "torch", "tensorflow", " np.", " tf."):
        assert framework not in source, framework


@pytest.mark.parametrize("name", backends.installed())
def test_namespace_covers_the_algorithm(name):
    namespace = backends.load(name).namespace()
    missing = sorted(n for n in _names_used_by_the_algorithm() if not hasattr(namespace, n))
    assert not missing, f"{name}'s namespace lacks {missing}"


def test_numpy_is_detected():
    x = np.ones(3)
    assert backend_of(query=x).name == "numpy"
    assert backend_of_type(np.ndarray) is backends.load("numpy")


def test_unknown_types_are_not_backends():
    for tp in (list, float, str, type(None)):
        assert backend_of_type(tp) is None


@pytest.mark.parametrize("name", [n for n in backends.REGISTRY if n != "numpy"])
def test_framework_arrays_are_detected(name):
    if importlib.util.find_spec(backends.REGISTRY[name]) is None:
        pytest.skip(f"{name} is not installed")
    backend = backends.load(name)
    x = backend.asarray(np.ones((3, 2, 4)), "float32")
    assert backend_of(query=x) is backend
    out = uniattn.attention(x, x, x)
    assert backend.is_array_type(type(out))


def test_load_rejects_unknown_names():
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.load("mxnet")
