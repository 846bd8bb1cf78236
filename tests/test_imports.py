"""Importing uniattn imports no framework; backends/ is installed as uniattn.backends only."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

FRAMEWORKS = ("numpy", "jax", "torch", "tensorflow")


def _run(code: str, cwd: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=True
    )
    return result.stdout.strip().splitlines()[-1]


def test_import_uniattn_imports_no_framework(tmp_path):
    code = (
        "import sys, json, uniattn, uniattn.backends, uniattn.bench, uniattn.bench.__main__\n"
        f"print(json.dumps([m for m in {FRAMEWORKS!r} if m in sys.modules]))"
    )
    assert json.loads(_run(code, tmp_path)) == []


def test_array_of_one_framework_imports_no_other(tmp_path):
    """Dispatching a NumPy call does not pull in JAX, torch or TensorFlow."""
    code = (
        "import sys, json, numpy as np, uniattn\n"
        "x = np.ones((4, 1, 8))\n"
        "uniattn.attention(x, x, x)\n"
        "print(json.dumps([m for m in ('jax', 'torch', 'tensorflow') if m in sys.modules]))"
    )
    assert json.loads(_run(code, tmp_path)) == []


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
    assert "uniattn/bench/__main__.py" in names
    assert not [n for n in names if n.startswith("backends/")], names


def test_every_registry_entry_has_an_adapter_module():
    from uniattn import backends

    root = Path(backends.__file__).parent
    for name in backends.REGISTRY:
        assert (root / f"{name}.py").is_file(), name
