"""Every documented misuse (docs/semantics.md, "Errors"), on every backend's arrays, eager
and compiled.

``tests/test_errors.py`` covers each argument's checks in depth on NumPy; here each documented
item is tried with the backend's own arrays, so that no error comes from deep inside a
framework (a framework's message would name none of our arguments).
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import uniattn

BATCH, Q_LEN, KV_LEN, HEADS, KV_HEADS, D = 2, 6, 7, 4, 2, 8


def _arrays(backend, dtype="float32"):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((BATCH, Q_LEN, HEADS, D))
    k = rng.standard_normal((BATCH, KV_LEN, KV_HEADS, D))
    v = rng.standard_normal((BATCH, KV_LEN, KV_HEADS, D))
    return [backend.asarray(x, dtype) for x in (q, k, v)]


def _other_framework(backend):
    """An array of another installed framework (NumPy unless the backend is NumPy)."""
    for name in uniattn.backends.installed():
        if name != backend.name:
            return uniattn.backends.harness(name)
    pytest.skip("needs a second framework")


# misuse -> (misuse(backend, q, k, v) -> attention kwargs, exception, message patterns)
MISUSES = {
    "arrays of different frameworks": (
        lambda b, q, k, v: dict(key=_other_framework(b).asarray(np.zeros((2, 7, 2, 8)))),
        TypeError,
        ["one framework", "key is a"],
    ),
    "unsupported array type": (
        lambda b, q, k, v: dict(value=np.zeros((2, 7, 2, 8)).tolist()),
        TypeError,
        ["value", "list"],
    ),
    "non-float dtype": (
        lambda b, q, k, v: dict(query=b.asarray(np.zeros((2, 6, 4, 8), np.int32))),
        TypeError,
        ["query", "floating", "int32"],
    ),
    "mismatched dtypes": (
        lambda b, q, k, v: dict(value=b.asarray(np.zeros((2, 7, 2, 8)), "float64")),
        TypeError,
        ["share a dtype", "float32", "float64"],
    ),
    "wrong mask dtype": (
        lambda b, q, k, v: dict(mask=b.asarray(np.ones((6, 7)), "float32")),
        TypeError,
        ["mask", "bool", "float32"],
    ),
    "non-integer lengths": (
        lambda b, q, k, v: dict(key_lengths=b.asarray(np.ones(2), "float32")),
        TypeError,
        ["key_lengths", "int"],
    ),
    "shape mismatch: d_k": (
        lambda b, q, k, v: dict(key=b.asarray(np.zeros((2, 7, 2, 4)), "float32")),
        ValueError,
        ["key", "d_k", r"\(2, 7, 2, 4\)"],
    ),
    "shape mismatch: kv_len": (
        lambda b, q, k, v: dict(value=b.asarray(np.zeros((2, 5, 2, 8)), "float32")),
        ValueError,
        ["value", "kv_len", r"\(2, 5, 2, 8\)"],
    ),
    "shape mismatch: batch": (
        lambda b, q, k, v: dict(key=b.asarray(np.zeros((3, 7, 2, 8)), "float32")),
        ValueError,
        ["batch", r"\(3, 7, 2, 8\)"],
    ),
    "shape mismatch: mask": (
        lambda b, q, k, v: dict(mask=b.asarray(np.ones((6, 8), bool))),
        ValueError,
        ["mask", r"\(6, 8\)", "broadcast"],
    ),
    "shape mismatch: bias": (
        lambda b, q, k, v: dict(bias=b.asarray(np.ones((3, 6, 7)), "float32")),
        ValueError,
        ["bias", r"\(3, 6, 7\)", "broadcast"],
    ),
    "shape mismatch: lengths": (
        lambda b, q, k, v: dict(query_lengths=b.asarray(np.ones(3, np.int32))),
        ValueError,
        ["query_lengths", r"\(3,\)"],
    ),
    "bad layout": (lambda b, q, k, v: dict(layout="THD"), ValueError, ["layout", "THD"]),
    "bad window": (lambda b, q, k, v: dict(window=(2, -1)), ValueError, ["window", "-1"]),
    "non-positive chunk size": (
        lambda b, q, k, v: dict(query_chunk_size=0),
        ValueError,
        ["query_chunk_size", "0"],
    ),
    "non-integer chunk size": (
        lambda b, q, k, v: dict(key_chunk_size=2.5),
        ValueError,
        ["key_chunk_size", "2.5"],
    ),
    "segment-id pair with a None": (
        lambda b, q, k, v: dict(segment_ids=(b.asarray(np.zeros((2, 6)), "float32"), None)),
        ValueError,
        ["segment_ids", "pair"],
    ),
    "float segment ids": (
        lambda b, q, k, v: dict(
            segment_ids=(b.asarray(np.zeros((2, 6)), "float32"), b.asarray(np.zeros((2, 7))))
        ),
        TypeError,
        [r"segment_ids\[0\]", "integer", "float32"],
    ),
    "shape mismatch: segment ids": (
        lambda b, q, k, v: dict(segment_ids=b.asarray(np.zeros((2, 6), np.int32))),
        ValueError,
        ["segment_ids", r"\(2, 7\)", "self-attention"],
    ),
    "sinks not broadcastable": (
        lambda b, q, k, v: dict(sinks=b.asarray(np.zeros(3), "float32")),
        ValueError,
        ["sinks", r"\(2, 4\)", r"\(3,\)"],
    ),
    "bad softcap": (lambda b, q, k, v: dict(softcap=-1.0), ValueError, ["softcap", "-1.0"]),
    "dropout without a seed": (
        lambda b, q, k, v: dict(dropout_rate=0.1),
        ValueError,
        ["dropout_seed", "0.1"],
    ),
    "float dropout seed": (
        lambda b, q, k, v: dict(dropout_rate=0.1, dropout_seed=b.asarray(np.zeros(()), "float32")),
        TypeError,
        ["dropout_seed", "float32"],
    ),
    "bad causal": (lambda b, q, k, v: dict(causal="upper"), ValueError, ["causal", "top_left"]),
    "heads not divisible by kv_heads": (
        lambda b, q, k, v: dict(query=b.asarray(np.zeros((2, 6, 3, 8)), "float32")),
        ValueError,
        ["3 heads", "2"],
    ),
}


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("misuse", sorted(MISUSES))
def test_misuse_raises_a_clear_error(backend, misuse, compiled):
    if compiled and backend.name == "torch":
        pytest.skip(
            "torch.compile meets the check as a graph break and runs it eagerly: the eager "
            "variant is the same code path"
        )
    make, exception, patterns = MISUSES[misuse]
    q, k, v = _arrays(backend)
    args = dict(query=q, key=k, value=v)
    args.update(make(backend, q, k, v))
    query = args.pop("query")  # the compiled function's argument; the rest are closed over

    def call(q):
        return uniattn.attention(q, **args)

    fn = backend.jit(call) if compiled else call
    with pytest.raises(exception) as info:
        fn(query)
    message = str(info.value)
    for pattern in patterns:
        assert re.search(pattern, message), f"{misuse}: {pattern!r} not in {message!r}"
