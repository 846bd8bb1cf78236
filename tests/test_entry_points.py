"""Backends other packages register under the entry-point group ``uniattn.backends``.

A fake installed distribution (a folder on ``sys.path`` holding ``*.dist-info`` with its
METADATA and entry_points.txt) registers ``fakearrays``, the adapter of a stand-in
framework whose arrays are array-api-strict's. Each check runs in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("array_api_strict")

ROOT = Path(__file__).absolute().parents[1]

FRAMEWORK = '''
"""A stand-in framework: its arrays are array-api-strict's."""
import array_api_strict

Array = type(array_api_strict.asarray(0.0))
__version__ = "1.0"
'''

ADAPTER = '''
"""uniattn's adapter for fakearrays, as a third-party package ships it."""
import array_api_strict as xp
import numpy as np

import fakearrays
from uniattn.backends import Backend, Harness

DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "float32", "float64")


class FakeBackend(Backend):
    name = "fakearrays"
    dtypes = ("float32", "float64")

    def is_array_type(self, tp):
        return issubclass(tp, fakearrays.Array)

    def namespace(self):
        return xp

    def dtype_name(self, x):
        return next(n for n in DTYPES if x.dtype == getattr(xp, n))


class FakeHarness(Harness):
    def version(self):
        return fakearrays.__version__

    def asarray(self, a, dtype=None):
        dtype = None if dtype is None else getattr(xp, dtype, None)
        return xp.asarray(np.array(a, copy=True), dtype=dtype)

    def to_numpy(self, x):
        return np.array(np.from_dlpack(x), copy=True)


backend = FakeBackend()
harness = FakeHarness(backend)
'''

ENTRY_POINTS = """[uniattn.backends]
fakearrays = fakearrays_uniattn:backend
numpy = fakearrays_uniattn:backend
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """A folder holding the framework, the adapter and the adapter's distribution."""
    root = tmp_path_factory.mktemp("site")
    (root / "fakearrays").mkdir()
    (root / "fakearrays" / "__init__.py").write_text(FRAMEWORK)
    (root / "fakearrays_uniattn.py").write_text(ADAPTER)
    info = root / "fakearrays_uniattn-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: fakearrays-uniattn\nVersion: 1.0\n"
    )
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    return root


def _env(site: Path) -> dict:
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def _run(site: Path, code: str):
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=site,
        env=_env(site),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


PRELUDE = """
import json, sys
import numpy as np
import uniattn
from uniattn import backends

def state():
    return {
        "read": backends._entry_points is not None,
        "adapter": "fakearrays_uniattn" in sys.modules,
        "framework": "fakearrays" in sys.modules,
        "strict": "array_api_strict" in sys.modules,
        "others": [m for m in ("jax", "torch", "tensorflow", "dask") if m in sys.modules],
    }
"""


def test_known_arrays_read_no_entry_points_and_unknown_ones_import_no_framework(site):
    """A NumPy call reads no metadata; an unknown type reads the entry points, but imports
    no registered adapter whose framework is not imported."""
    code = PRELUDE + (
        "x = np.ones((2, 4, 1, 8))\n"
        "uniattn.attention(x, x, x)\n"
        "after_numpy = state()\n"
        "try:\n"
        "    uniattn.attention(x.tolist(), x, x)\n"
        "except TypeError as e:\n"
        "    message = str(e)\n"
        "print(json.dumps([after_numpy, state(), message, sorted(backends.entry_points())]))"
    )
    after_numpy, after_unknown, message, registered = _run(site, code)
    nothing = {"adapter": False, "framework": False, "strict": False, "others": []}
    assert after_numpy == {"read": False, **nothing}
    assert after_unknown == {"read": True, **nothing}
    assert "registered backends: fakearrays" in message
    assert registered == ["fakearrays"]  # "numpy" is the dedicated adapter's name


def test_a_registered_backend_is_used_once_its_framework_is_imported(site):
    code = PRELUDE + (
        "import array_api_strict as xp\n"
        "x = xp.ones((2, 4, 1, 8))\n"
        "from uniattn._dispatch import backend_of\n"
        "generic = backend_of(query=x).name\n"
        "generic_state = state()\n"
        "import fakearrays\n"
        "from uniattn._dispatch import backend_of_type, _GENERIC\n"
        "backend_of_type.cache.clear(); _GENERIC.clear()\n"  # a fresh type lookup
        "out = uniattn.attention(x, x, x, causal=True)\n"
        "registered = backend_of(query=x)\n"
        "print(json.dumps([generic, generic_state, registered.name, type(out).__name__,\n"
        "    backends.harness('fakearrays').adapter is registered,\n"
        "    backends.loaded('fakearrays'), 'fakearrays' in backends.available(), state(),\n"
        "    backend_of(query=np.ones((2, 4, 1, 8))).name]))"
    )
    generic, generic_state, name, out_type, same, loaded, available, final, numpy = _run(site, code)
    assert generic == "array_api_strict"  # the generic adapter: fakearrays not imported
    assert generic_state == {
        "read": True,
        "adapter": False,
        "framework": False,
        "strict": True,
        "others": [],
    }
    assert name == "fakearrays" and out_type == "Array" and same and loaded and available
    assert final["adapter"] and final["framework"]
    assert numpy == "numpy"  # an entry point cannot take a dedicated adapter's arrays


def test_the_conformance_suite_runs_against_a_registered_backend(site):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "conformance/test_reference.py",
            "conformance/test_semantics.py",
            "--backend=fakearrays",
            "-k",
            "basic or key-lengths or test_output_type_and_device",
        ],
        cwd=ROOT,
        env=_env(site),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "uniattn backends: fakearrays 1.0" in result.stdout
    assert " passed" in result.stdout and "failed" not in result.stdout
