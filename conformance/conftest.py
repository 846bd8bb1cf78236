"""Conformance suite: ``pytest conformance --backend=NAME`` (repeatable) ``[--device=NAME]``.

NAME is a dedicated adapter (numpy, jax, torch, tensorflow), an array-API library the
generic adapter serves (array_api_strict, dask, or any other installed one), or a backend
another package registers under the entry-point group ``uniattn.backends``. Without
``--backend`` every installed backend is tested (``uniattn.backends.available()``);
without ``--device``, on each framework's default device (``--device cuda``: torch's GPU;
JAX names it ``gpu``; array-api-strict has ``device1``). Tests that take a ``backend``
argument run once per selected backend; tests that also take ``case`` and ``dtype`` run
over the case table in each dtype the backend supports, except on the backends of
:data:`PARTIAL`, which compile each case and run part of the table unless ``--full``.

``--array-api-strict-flags=strictest`` runs array-api-strict at the oldest version of the
standard the algorithm needs, with no data-dependent shapes, no boolean indexing and no
extensions (:data:`STRICTEST`), here and in the processes the suite starts.
"""

from __future__ import annotations

import gc
import os
import sys
from typing import NamedTuple

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

from . import harness
from .cases import ALL_DTYPES, CASES, DTYPE_CASES, REPRESENTATIVE, WIDE
from .xfails import NEEDS_DTYPE, SKIPS, XFAILS

# array-api-strict's strictest settings (its environment variables: subprocesses inherit
# them): the oldest version of the standard the algorithm needs (2024.12: where() with a
# Python scalar), and none of what the flags switch off.
STRICTEST = {
    "ARRAY_API_STRICT_API_VERSION": "2024.12",
    "ARRAY_API_STRICT_BOOLEAN_INDEXING": "False",
    "ARRAY_API_STRICT_DATA_DEPENDENT_SHAPES": "False",
    "ARRAY_API_STRICT_ENABLED_EXTENSIONS": "",
}

#: Test prefix -> the parameter ids a backend of :data:`PARTIAL` keeps (each kept tuple's
#: parts must all appear in the test's id; an empty list: the test does not run).
Parameters = dict[str, list[tuple[str, ...]]]

# A NaN takes the same path as an infinity (``isfinite``): every placement and structure
# with NaN, and every value with one structure.
_NON_FINITE = {
    "test_adversarial.py::test_non_finite_input_affects_only_rows_that_attend_it[": [
        ("nan",),
        ("key-lengths",),
    ],
}
# backward="autodiff" compiles the rematerialised loops and their transpose, half a case's
# time on JAX: float32, on the cases whose structure sets the loops (bands, data-dependent
# bounds, empty loops, folded decoding); "everything" adds every formula to differentiate
# (bias, segment bounds, sinks, soft cap, dropout) at once.
_AUTODIFF_CASES = (
    "basic",
    "causal-q-longer",
    "window-q-longer",
    "mask-and-bias-causal",
    "key-lengths",
    "empty-batch-lengths",
    "no-keys",
    "decode-gqa-lengths",
    "packed-decode",
    "sinks-decode",
    "everything",
)


def _exact(backend: str, names, dtypes) -> list[tuple[str, ...]]:
    """The ids ``[backend-case-dtype]`` of the cases ``names`` in ``dtypes``."""
    return [(f"[{backend}-{name}-{dtype}]",) for name in names for dtype in dtypes]


def _gradient_parts(backend: str) -> Parameters:
    """The gradient tests' part on a compiling ``backend``: ``backward="autodiff"`` above;
    uniattn.vjp on the dtype cases in float32, since it calls the same staged forward and
    backward as the framework's custom-gradient hook (test_gradients_custom: every
    representative case, the dtype cases in every dtype), which each entry compiles apart."""
    return {
        "test_reference.py::test_gradients_autodiff[": _exact(
            backend, _AUTODIFF_CASES, ("float32",)
        ),
        "test_reference.py::test_gradients_vjp[": _exact(backend, DTYPE_CASES, ("float32",)),
    }


# Dask's laziness changes how loop bounds are found and empty shapes chunked; the generic
# adapter's arithmetic runs the whole table on array-api-strict.
_LAZY_CASES = (
    "key-lengths",
    "lengths-two-batch-axes",
    "empty-batch-lengths",
    "no-queries",
    "no-keys",
    "packed-decode",
    "sinks-decode",
    "softcap",
)


class Partial(NamedTuple):
    """How a backend's default run is cut down: ``cases`` run in ``dtype``, those of
    ``dtype_cases`` also in every other dtype they list (``cases`` None: the whole table in
    every dtype); ``parameters`` are the ones kept of some tests; ``reason`` says why."""

    cases: tuple[str, ...] | None
    dtype: str | None
    dtype_cases: tuple[str, ...]
    parameters: Parameters
    reason: str


#: Backends whose default run covers part of the suite (``--full``: everything). The
#: algorithm runs every case in every dtype on NumPy, PyTorch and array-api-strict; what
#: JAX, TensorFlow and Dask add is how they stage it, which the part kept covers.
PARTIAL: dict[str, Partial] = {
    "jax": Partial(
        REPRESENTATIVE,
        "float32",
        DTYPE_CASES,
        {**_NON_FINITE, **_gradient_parts("jax")},
        "each (case, dtype) compiles a forward, a backward and an autodiff program: about "
        "16 s with XLA on a 2-core CPU, some 50 minutes for the whole table (180 of them)",
    ),
    "tensorflow": Partial(
        REPRESENTATIVE,
        "float32",
        DTYPE_CASES,
        {**_NON_FINITE, **_gradient_parts("tensorflow")},
        "each (case, dtype) traces a forward and a backward tf.function graph: about 6 s "
        "on a 2-core CPU, some 20 minutes for the whole table (180 of them)",
    ),
    "torch": Partial(
        None,
        None,
        (),
        {
            "test_compiled.py::test_compiled_gradient_step[": [],
            "test_compiled.py::test_compiled_forward_equals_eager[": [
                ("[torch-mask-and-bias-causal]",)
            ],
            "test_compiled.py::test_gradient_through_compiled_function[": [],
            "test_reference.py::test_gradients_autodiff[": [
                *_exact("torch", CASES, ("float32",)),
                *_exact("torch", DTYPE_CASES, ALL_DTYPES),
            ],
        },
        "lengths and segment ids break torch's graph at every band of the loops (their trip "
        "counts must be ints), so a compiled case with them is some 40 Inductor graphs, 1-2 "
        "minutes on a 2-core CPU, and Inductor takes about a minute for one graph's forward "
        "and backward: the compiled forward runs the case that is one graph; gradients "
        "through torch.compile are checked by tests/test_torch_compile.py (both modes, one "
        "graph, AOTAutograd) and test_fori_loop_differentiates_with_array_bounds (Inductor); "
        "test_segment_ids_are_data and test_fori_loop_bounds compile across the breaks. "
        "backward='autodiff' is torch's autograd through the loops whose values every case "
        "checks in every dtype: it runs every case in float32 and the dtype cases in each",
    ),
    "dask": Partial(
        DTYPE_CASES + _LAZY_CASES,
        "float64",
        (),
        {
            # Chunk size 1 is 1517 chunk pairs.
            "test_features.py::test_dropout_mask_ignores_chunks_and_layout[": [],
            "test_semantics.py::test_chunk_size_invariance[": [("16x16",), ("10000x10000",)],
            "test_adversarial.py::test_non_finite_input_affects_only_rows_that_attend_it[": [
                ("key-lengths", "nan"),
            ],
        },
        "Dask runs the generic adapter that array-api-strict runs the whole suite "
        "through, on NumPy blocks (float64 only: NumPy computes each block, whatever the "
        "dtype); what it adds is a lazy graph, some 20 tasks per chunk pair forward and 40 "
        "with the backward, each about a millisecond to build and as much to run",
    ),
}

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
        help="backend to run the conformance suite on (repeatable; default: all installed, "
        f"{backends.available()})",
    )
    parser.addoption(
        "--array-api-strict-flags",
        choices=["default", "strictest"],
        default="default",
        help="array-api-strict's flags: its defaults, or the standard's 2024.12 version "
        "with no data-dependent shapes, no boolean indexing and no extensions",
    )
    parser.addoption(
        "--full",
        action="store_true",
        help="run the whole suite on every backend; without it JAX, TensorFlow and Dask run "
        "part of the case table and torch part of its compiled and autodiff tests (PARTIAL "
        "in conformance/conftest.py says what and why)",
    )
    parser.addoption(
        "--implementation",
        choices=["chunked", "fused", "default"],
        default="chunked",
        help="the implementation the case table's calls ask for: uniattn's chunked algorithm "
        "(default), the framework's fused kernel (cases it cannot compute are skipped with "
        "the reason), or the default choice (implementation=None); test_fused.py runs the "
        "fused path in float32 and float64 (every dtype on an accelerator) whatever this says",
    )
    parser.addoption(
        "--device",
        default=None,
        help="the framework's name of the device to put the inputs on, e.g. cuda, gpu, "
        "cpu (default: the framework's default device)",
    )


def selected_backends(config) -> list[str]:
    names = config.getoption("backend") or backends.available()
    for name in names:
        if name in backends.available():
            continue
        if name in (*backends.REGISTRY, *backends.ARRAY_API_LIBRARIES):
            raise pytest.UsageError(f"--backend {name}: framework not installed")
        try:
            backends.load(name)  # another array-API library, by the name of its module
        except ValueError as e:
            raise pytest.UsageError(f"--backend {name}: {e}") from None
    return names


def use_strictest_flags() -> None:
    """array-api-strict's strictest flags, for this process and the ones it starts."""
    os.environ.update(STRICTEST)
    if "array_api_strict" in sys.modules:
        import array_api_strict

        array_api_strict.set_array_api_strict_flags(
            api_version=STRICTEST["ARRAY_API_STRICT_API_VERSION"],
            boolean_indexing=False,
            data_dependent_shapes=False,
            enabled_extensions=(),
        )


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "needs_fused: runs on backends with a fused attention kernel on the inputs' device",
    )
    chosen = config.getoption("implementation")
    harness.IMPLEMENTATION = None if chosen == "default" else chosen
    if config.getoption("array_api_strict_flags") == "strictest":
        use_strictest_flags()
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
    header = "uniattn backends: " + ", ".join(f"{b.name} {b.version()}" for b in loaded) + where
    if "array_api_strict" in sys.modules:
        import array_api_strict

        header += f"\narray-api-strict flags: {array_api_strict.get_array_api_strict_flags()}"
    partial = [b.name for b in loaded if _partial(config, b) is not None]
    if partial:
        header += f"\npart of the suite on {', '.join(partial)} (--full: all of it)"
    return header


def pytest_generate_tests(metafunc):
    fixtures = metafunc.fixturenames
    if "backend" not in fixtures:
        return
    loaded = loaded_backends(metafunc.config)
    marks = getattr(metafunc.function, "pytestmark", [])
    if any(m.name == "needs_autodiff" for m in marks):
        loaded = [b for b in loaded if b.has_autodiff]
    fused = metafunc.definition.get_closest_marker("needs_fused") is not None
    if fused:
        loaded = [b for b in loaded if has_fused_kernel(b)]
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
            and _runs(metafunc.config, b, case, dtype)
            and (not fused or dtype in WIDE or b.array_platform() != "cpu")
        ]
        if fused and not params:
            reason = "no selected backend has a fused attention kernel on its arrays' device"
            params = [pytest.param(None, None, None, marks=pytest.mark.skip(reason=reason))]
        metafunc.parametrize(("backend", "case", "dtype"), params)
    else:
        metafunc.parametrize("backend", loaded, ids=[b.name for b in loaded])


_FUSED: dict[str, bool] = {}


def has_fused_kernel(backend) -> bool:
    """Whether ``backend`` has a fused attention kernel for a plain float32 call on its
    arrays' device (``--device``); such backends run test_fused.py."""
    key = f"{backend.name}:{backend.array_device}"
    if key not in _FUSED:
        _FUSED[key] = type(backend.adapter).fused is not backends.Backend.fused
        if _FUSED[key]:
            import numpy as np

            import uniattn

            x = backend.asarray(np.zeros((1, 8, 2, 8)), "float32")
            try:
                uniattn.attention(x, x, x, implementation="fused")
            except ValueError:
                _FUSED[key] = False
    return _FUSED[key]


def _partial(config, backend) -> Partial | None:
    """How ``backend``'s run is cut down (:data:`PARTIAL`), or None: it runs in full."""
    return None if config.getoption("full") else PARTIAL.get(backend.name)


def _runs(config, backend, case, dtype) -> bool:
    """Whether ``case`` runs in ``dtype`` on ``backend`` (:data:`PARTIAL`)."""
    partial = _partial(config, backend)
    if partial is None or partial.cases is None:
        return True
    if case.name not in partial.cases:
        return False
    return dtype == partial.dtype or case.name in partial.dtype_cases


def _kept(partial: Partial, test_id: str) -> bool:
    for prefix, kept in partial.parameters.items():
        if test_id.startswith(prefix):
            return any(all(part in test_id for part in ids) for ids in kept)
    return True


def pytest_collection_modifyitems(config, items):
    kept, deselected = [], []
    for item in items:
        backend = getattr(item, "callspec", None) and item.callspec.params.get("backend")
        if not hasattr(backend, "name"):  # not a conformance test's backend fixture
            kept.append(item)
            continue
        test_id = f"{item.path.name}::{item.name}"
        partial = _partial(config, backend)
        if partial is not None and not _kept(partial, test_id):
            deselected.append(item)
            continue
        kept.append(item)
        for prefix, reason in XFAILS.get(backend.name, {}).items():
            if test_id.startswith(prefix):
                item.add_marker(pytest.mark.xfail(reason=reason, strict=True))
        for prefix, reason in SKIPS.get(backend.name, {}).items():
            if test_id.startswith(prefix):
                item.add_marker(pytest.mark.skip(reason=reason))
        for prefix, dtype in NEEDS_DTYPE.items():
            if test_id.startswith(prefix) and dtype not in backend.dtypes:
                item.add_marker(pytest.mark.skip(reason=f"{backend.name} has no {dtype}"))
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept
