"""Importing uniattn imports no framework and no array library (nothing but the standard
library); backends/ is installed as uniattn.backends only."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

FRAMEWORKS = ("numpy", "jax", "torch", "tensorflow")
#: Array libraries the generic adapter serves, and array-api-compat, which it imports.
ARRAY_LIBRARIES = ("array_api_compat", "array_api_strict", "dask", "cupy")


def _run(code: str, cwd: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=True
    )
    return result.stdout.strip().splitlines()[-1]


def test_import_uniattn_imports_no_framework(tmp_path):
    code = (
        "import sys, json, uniattn, uniattn.backends, uniattn.bench, uniattn.bench.__main__\n"
        f"print(json.dumps([m for m in {FRAMEWORKS + ARRAY_LIBRARIES!r} if m in sys.modules]))"
    )
    assert json.loads(_run(code, tmp_path)) == []


def test_integrations_import_their_library_only_when_used():
    """``import uniattn`` and ``uniattn.integrations`` import no model library; the Flax
    integration imports JAX (never Flax itself, whose modules only call it)."""
    libraries = ("flax", "keras", "transformers", "jax", "torch", "tensorflow")
    code = (
        "import sys, json\n"
        f"libraries = {libraries!r}\n"
        "loaded = lambda: [m for m in libraries if m in sys.modules]\n"
        "import uniattn, uniattn.integrations\n"
        "before = loaded()\n"
        "import uniattn.integrations.flax\n"
        "print(json.dumps([before, loaded()]))"
    )
    assert json.loads(_run(code, Path(__file__).resolve().parents[1])) == [[], ["jax"]]


#: Model libraries uniattn.integrations plugs into (and the frameworks they load).
MODEL_LIBRARIES = ("transformers", "flax", "keras", "safetensors", "huggingface_hub")


def test_import_integrations_imports_no_model_library_or_framework(tmp_path):
    """The integrations import their library when used, not when imported."""
    code = (
        "import sys, json, uniattn.integrations, uniattn.integrations.transformers\n"
        f"watched = {FRAMEWORKS + ARRAY_LIBRARIES + MODEL_LIBRARIES!r}\n"
        "print(json.dumps([m for m in watched if m in sys.modules]))"
    )
    assert json.loads(_run(code, tmp_path)) == []


def test_import_uniattn_pulls_in_only_the_standard_library(tmp_path):
    """Every top-level module ``import uniattn`` adds is uniattn or the standard library's;
    the entry points of other packages' backends are not read yet."""
    code = (
        "import sys, json\n"
        "before = set(sys.modules)\n"
        "import uniattn, uniattn.backends\n"
        "new = {m.partition('.')[0] for m in set(sys.modules) - before}\n"
        "print(json.dumps([sorted(new - set(sys.stdlib_module_names)),\n"
        "    uniattn.backends._entry_points is None]))"
    )
    assert json.loads(_run(code, tmp_path)) == [["uniattn"], True]


def test_array_of_one_framework_imports_no_other(tmp_path):
    """Dispatching a NumPy call does not pull in JAX, torch, TensorFlow or an array
    library, nor the generic adapter."""
    others = (
        "jax",
        "torch",
        "tensorflow",
        "array_api_strict",
        "dask",
        "uniattn.backends.array_api",
    )
    code = (
        "import sys, json, numpy as np, uniattn\n"
        "x = np.ones((4, 1, 8))\n"
        "uniattn.attention(x, x, x)\n"
        f"print(json.dumps([m for m in {others!r} if m in sys.modules]))"
    )
    assert json.loads(_run(code, tmp_path)) == []


def test_array_of_an_array_library_imports_no_framework(tmp_path):
    """An array-api-strict call goes through the generic adapter and imports no
    framework, nor Dask."""
    pytest.importorskip("array_api_strict")
    code = (
        "import sys, json, array_api_strict as xp, uniattn\n"
        "x = xp.ones((4, 1, 8))\n"
        "out = uniattn.attention(x, x, x)\n"
        "others = ('jax', 'torch', 'tensorflow', 'dask')\n"
        "print(json.dumps([type(out).__module__, [m for m in others if m in sys.modules]]))"
    )
    assert json.loads(_run(code, tmp_path)) == ["array_api_strict._array_object", []]


def test_backends_is_a_subpackage_not_a_top_level_module(tmp_path):
    code = (
        "import importlib.util, json, uniattn.backends as b\n"
        "print(json.dumps([b.__name__, importlib.util.find_spec('backends') is None]))"
    )
    assert json.loads(_run(code, tmp_path)) == ["uniattn.backends", True]


def test_wheel_installs_backends_inside_uniattn(tmp_path):
    """The built wheel holds uniattn/backends/*.py and no top-level backends/."""
    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(root),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("uniattn-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "uniattn/backends/torch.py" in names
    assert "uniattn/backends/tensorflow.py" in names
    assert "uniattn/backends/array_api.py" in names
    assert "uniattn/bench/__main__.py" in names
    assert "uniattn/integrations/transformers.py" in names
    assert not [n for n in names if n.startswith("backends/")], names


def test_every_registry_entry_has_an_adapter_module():
    from uniattn import backends

    root = Path(backends.__file__).parent
    for name in backends.REGISTRY:
        assert (root / f"{name}.py").is_file(), name
