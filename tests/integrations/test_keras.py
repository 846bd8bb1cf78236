"""uniattn.integrations.keras on each Keras backend, in a process of its own (Keras
reads KERAS_BACKEND when first imported): keras_checks.py compares the op and the layers
with Keras's own (values, one training step's update), trains with model.fit, and saves
and loads a model."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


@pytest.mark.parametrize("keras_backend", ["jax", "torch", "tensorflow"])
def test_keras_backend(keras_backend, tmp_path):
    backend = keras_backend
    for module in ("keras", backend):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    # XLA (jax, and TensorFlow's jit-compiled training step) spends most of a compile in
    # LLVM's optimiser; the checks run each program a few times.
    if "xla_backend_optimization_level" not in env.get("XLA_FLAGS", ""):
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0"
    result = subprocess.run(
        [sys.executable, str(HERE / "keras_checks.py"), str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert f"{backend}: check_training ok" in result.stdout, result.stdout
