"""Conformance suite: ``pytest conformance --backend=NAME`` (repeatable) ``[--device=NAME]``.

Without ``--backend`` every installed backend is tested; without ``--device``, on each
framework's default device (``--device cuda``: torch's GPU; JAX names it ``gpu``). Tests
that take a ``backend`` argument run once per selected backend; tests that also take
``case`` and ``dtype`` run over the case table in each dtype the backend supports.
"""

from __future__ import annotations

import gc
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# float64 cases need JAX's x64 mode (array-api-tests does the same); the x64-off default
# has its own test in test_semantics.py.
os.environ.setdefault("JAX_ENABLE_X64", "1")
# JAX multiplies float32 in TF32 on NVIDIA GPUs by default (uniattn follows the setting,
# as every JAX op does); the float32 tolerances are for float32 products.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
# XLA:CPU spends most of a compile in LLVM's optimiser, and the suite compiles a program
# per (case, dtype, backward mode) to run it once: LLVM at -O0 halves the suite's time.
# XLA's own passes (fusion, layouts, loops, buffers) run as usual. XLA_FLAGS that set a
# level (e.g. --xla_backend_optimization_level=2, the default) are left alone.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()

import pytest
from hypothesis import HealthCheck, settings

from uniattn import backends

from .cases import CASES
from .xfails import XFAILS

# Hypothesis profiles (test_properties.py): "ci", the default, is seeded and bounded;
# ``--hypothesis-profile=long`` is for release checks.
_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=400, derandomize=True, **_common)
settings.register_profile("long", max_examples=3000, **_common)
settings.load_profile("ci")


def pytest_addoption(parser):
    parser.addoption(
        "--backend",
        action="append",
        default=[],
        choices=list(backends.REGISTRY),
        help="backend to run the conformance suite on (repeatable; default: all installed)",
    )
    parser.addoption(
        "--device",
        default=None,
        help="the framework's name of the device to put the inputs on, e.g. cuda, gpu, "
        "cpu (default: the framework's default device)",
    )


def selected_backends(config) -> list[str]:
    names = config.getoption("backend") or backends.installed()
    missing = [n for n in names if n not in backends.installed()]
    if missing:
        raise pytest.UsageError(f"--backend {missing}: framework not installed")
    return names


def pytest_configure(config):
    config.uniattn_backends = selected_backends(config)
    config.uniattn_loaded = None


def loaded_backends(config) -> list:
    """The selected backends' harnesses (imported on first use), placed on ``--device``
    if given."""
    if config.uniattn_loaded is None:
        device = config.getoption("device")
        loaded = [backends.harness(n) for n in config.uniattn_backends]
        if device is not None:
            try:
                loaded = [b.on(device) for b in loaded]
            except ValueError as e:
                raise pytest.UsageError(f"--device {device}: {e}") from None
        config.uniattn_loaded = loaded
    return config.uniattn_loaded


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session):
    """Exempt what the run built from the collections that follow it.

    With the frameworks' compiled programs and caches alive, each full collection takes
    about a second, and pytest's cleanup and the interpreter's exit run several. An xdist
    worker still collecting 5 s after the run gets a SIGINT from execnet (CI showed the
    KeyboardInterrupt it raised inside a gc callback). Nothing after the session needs
    these objects freed.
    """
    gc.freeze()


def pytest_report_header(config):
    loaded = loaded_backends(config)
    where = f" on {config.getoption('device')}" if config.getoption("device") else ""
    return "uniattn backends: " + ", ".join(f"{b.name} {b.version()}" for b in loaded) + where


def pytest_generate_tests(metafunc):
    fixtures = metafunc.fixturenames
    if "backend" not in fixtures:
        return
    loaded = loaded_backends(metafunc.config)
    marks = getattr(metafunc.function, "pytestmark", [])
    if any(m.name == "needs_autodiff" for m in marks):
        loaded = [b for b in loaded if b.has_autodiff]
    if "case" in fixtures:
        # One xdist group per (backend, case, dtype): its tests then share compilations.
        params = [
            pytest.param(
                b,
                case,
                dtype,
                id=f"{b.name}-{case.name}-{dtype}",
                marks=pytest.mark.xdist_group(f"{b.name}-{case.name}-{dtype}"),
            )
            for b in loaded
            for case in CASES.values()
            for dtype in case.dtypes
            if dtype in b.dtypes
        ]
        metafunc.parametrize(("backend", "case", "dtype"), params)
    else:
        metafunc.parametrize("backend", loaded, ids=[b.name for b in loaded])


def pytest_collection_modifyitems(config, items):
    for item in items:
        backend = getattr(item, "callspec", None) and item.callspec.params.get("backend")
        if backend is None:
            continue
        test_id = f"{item.path.name}::{item.name}"
        for prefix, reason in XFAILS.get(backend.name, {}).items():
            if test_id.startswith(prefix):
                item.add_marker(pytest.mark.xfail(reason=reason, strict=True))
