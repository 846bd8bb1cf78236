"""Bad input raises TypeError/ValueError naming the argument and the shapes or types."""

from __future__ import annotations

import re

import numpy as np
import pytest

import uniattn


def arrays(q_shape=(2, 10, 4, 8), kv_shape=(2, 12, 2, 8), dtype=np.float32):
    rng = np.random.default_rng(0)
    q = rng.standard_normal(q_shape).astype(dtype)
    k = rng.standard_normal(kv_shape).astype(dtype)
    return q, k, k.copy()


def raises(exc, *patterns):
    """pytest.raises that also checks every pattern occurs in the message."""

    class Check:
        def __enter__(self):
            self.ctx = pytest.raises(exc)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *args):
            suppressed = self.ctx.__exit__(*args)
            message = str(self.info.value)
            for pattern in patterns:
                assert re.search(pattern, message), f"{pattern!r} not in {message!r}"
            return suppressed

    return Check()


def test_unsupported_array_type():
    q, k, v = arrays()
    with raises(TypeError, "query", "list"):
        uniattn.attention(q.tolist(), k, v)
    with raises(TypeError, "bias", "str"):
        uniattn.attention(q, k, v, bias="nope")


def test_arrays_of_two_frameworks():
    torch = pytest.importorskip("torch", reason="needs a second framework")
    q, k, v = arrays()
    with raises(TypeError, "one framework", r"query is a numpy", r"key is a torch", "Tensor"):
        uniattn.attention(q, torch.from_numpy(k), v)
    with raises(TypeError, "one framework", r"mask is a torch"):
        uniattn.attention(q, k, v, mask=torch.ones(10, 12, dtype=torch.bool))


@pytest.mark.parametrize("dtype", [np.int32, np.bool_, np.complex64])
def test_non_float_dtype(dtype):
    q, k, v = arrays()
    with raises(TypeError, "query", "floating", np.dtype(dtype).name):
        uniattn.attention(q.astype(dtype), k, v)


def test_mismatched_dtypes():
    q, k, v = arrays()
    with raises(TypeError, "share a dtype", "query is float32", "value is float64"):
        uniattn.attention(q, k, v.astype(np.float64))


def test_mask_must_be_bool():
    q, k, v = arrays()
    with raises(TypeError, "mask", "bool", "float32"):
        uniattn.attention(q, k, v, mask=np.ones((10, 12), np.float32))


def test_bias_must_be_float():
    q, k, v = arrays()
    with raises(TypeError, "bias", "floating", "int64"):
        uniattn.attention(q, k, v, bias=np.ones((10, 12), np.int64))


def test_unsupported_dtype_of_backend():
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="needs a NumPy bfloat16 dtype")
    q, k, v = (x.astype(ml_dtypes.bfloat16) for x in arrays())
    with raises(TypeError, "query", "bfloat16", "numpy backend"):
        uniattn.attention(q, k, v)


@pytest.mark.parametrize("layout", ["BTDH", "bthd", None, 3])
def test_bad_layout(layout):
    with raises(ValueError, "layout", "BTHD", "BHTD", re.escape(repr(layout))):
        uniattn.attention(*arrays(), layout=layout)


def test_too_few_axes():
    q, k, v = arrays()
    with raises(ValueError, "query", r"at least 3", r"\(10, 8\)"):
        uniattn.attention(q[0, :, 0], k, v)


def test_batch_axes_differ():
    q, k, v = arrays()
    with raises(ValueError, "batch", r"\(2, 10, 4, 8\)", r"key has shape \(3, 12, 2, 8\)"):
        uniattn.attention(q, np.concatenate([k, k[:1]]), v)
    with raises(ValueError, "batch", r"value has shape \(12, 2, 8\)"):
        uniattn.attention(q, k, v[0])


def test_head_dims_differ():
    q, k, v = arrays()
    with raises(ValueError, "key", "d_k = 8", "d_k = 4", r"\(2, 12, 2, 4\)"):
        uniattn.attention(q, k[..., :4], v)


def test_key_value_lengths_differ():
    q, k, v = arrays()
    with raises(ValueError, "value", "kv_len = 12", r"\(2, 11, 2, 8\)"):
        uniattn.attention(q, k, v[:, :11])


def test_heads_not_divisible():
    q, k, v = arrays(q_shape=(2, 10, 3, 8))
    with raises(ValueError, "multiple", "3 heads", "has 2", r"\(2, 12, 2, 8\)"):
        uniattn.attention(q, k, v)


def test_layout_is_used_for_shapes():
    """The same arrays are valid in one layout and not in the other."""
    q, k, v = arrays(q_shape=(2, 4, 10, 8), kv_shape=(2, 2, 12, 8))
    assert uniattn.attention(q, k, v, layout="BHTD").shape == (2, 4, 10, 8)
    with raises(ValueError, "multiple", "10 heads", "has 12"):
        uniattn.attention(q, k, v, layout="BTHD")


@pytest.mark.parametrize("name", ["bias", "mask"])
@pytest.mark.parametrize("shape", [(10, 13), (3, 10, 12), (1, 2, 4, 10, 12), (5, 1, 1, 12)])
def test_score_operand_not_broadcastable(name, shape):
    q, k, v = arrays()
    x = np.zeros(shape, bool if name == "mask" else np.float32)
    with raises(
        ValueError, name, "broadcastable", re.escape(str((2, 4, 10, 12))), re.escape(str(shape))
    ):
        uniattn.attention(q, k, v, **{name: x})


@pytest.mark.parametrize("name", ["query_chunk_size", "key_chunk_size"])
@pytest.mark.parametrize("value", [0, -3, 2.5, "8", True])
def test_bad_chunk_size(name, value):
    with raises(ValueError, name, "positive integer", re.escape(repr(value))):
        uniattn.attention(*arrays(), **{name: value})


def test_chunk_size_accepts_numpy_integers():
    out = uniattn.attention(*arrays(), query_chunk_size=np.int64(3), key_chunk_size=np.int32(5))
    assert out.shape == (2, 10, 4, 8)


@pytest.mark.parametrize("name", ["causal", "return_lse"])
@pytest.mark.parametrize("value", [1, "yes", None, np.ones(1)])
def test_flags_must_be_bool(name, value):
    # causal also takes two strings: another string is a ValueError (test_causal_strings)
    error = ValueError if (name, value) == ("causal", "yes") else TypeError
    with raises(error, name, "bool"):
        uniattn.attention(*arrays(), **{name: value})


def test_bad_scale():
    with raises(TypeError, "scale", "real number", "str"):
        uniattn.attention(*arrays(), scale="1")
    with raises(ValueError, "scale", "finite", "nan"):
        uniattn.attention(*arrays(), scale=float("nan"))


def test_bad_backward_mode():
    with raises(ValueError, "backward", "custom", "autodiff", "'manual'"):
        uniattn.attention(*arrays(), backward="manual")


@pytest.mark.parametrize("value", ["flash", "Fused", ""])
def test_bad_implementation(value):
    with raises(ValueError, "implementation", "None", "'chunked'", "'fused'", repr(value)):
        uniattn.attention(*arrays(), implementation=value)
    with raises(ValueError, "implementation", repr(value)):
        uniattn.vjp(*arrays(), implementation=value)


@pytest.mark.parametrize("value", [True, 1, ["fused"]])
def test_implementation_type(value):
    with raises(TypeError, "implementation", "None", "'fused'", type(value).__name__):
        uniattn.attention(*arrays(), implementation=value)


def test_keyword_only_options():
    q, k, v = arrays()
    with pytest.raises(TypeError):
        uniattn.attention(q, k, v, None)  # bias must be passed by name


@pytest.mark.parametrize(
    "window", [(1,), (1, 2, 3), (-1, 0), (0, -2), (1.5, 0), (True, 0), "ab", 3, [None, "x"]]
)
def test_bad_window(window):
    q, k, v = arrays()
    with raises(ValueError, "window", "left, right", re.escape(repr(window))):
        uniattn.attention(q, k, v, window=window)


def test_window_accepts_none_sides_and_lists():
    q, k, v = arrays()
    full = uniattn.attention(q, k, v)
    np.testing.assert_array_equal(uniattn.attention(q, k, v, window=(None, None)), full)
    np.testing.assert_array_equal(uniattn.attention(q, k, v, window=[np.int64(20), 20]), full)


@pytest.mark.parametrize("name", ["query_lengths", "key_lengths"])
def test_lengths_must_be_integer(name):
    q, k, v = arrays()
    with raises(TypeError, name, "integer", "float32"):
        uniattn.attention(q, k, v, **{name: np.array([3.0, 4.0], np.float32)})


@pytest.mark.parametrize("name", ["query_lengths", "key_lengths"])
@pytest.mark.parametrize("shape", [(), (1,), (2, 1), (3,)])
def test_lengths_must_have_batch_shape(name, shape):
    q, k, v = arrays()
    with raises(ValueError, name, r"\[\*batch\] = \(2,\)", re.escape(str(shape))):
        uniattn.attention(q, k, v, **{name: np.zeros(shape, np.int32)})


def test_lengths_of_another_framework():
    torch = pytest.importorskip("torch", reason="needs a second framework")
    q, k, v = arrays()
    with raises(TypeError, "one framework", "key_lengths is a torch"):
        uniattn.attention(q, k, v, key_lengths=torch.tensor([3, 4]))


def test_callable_bias_must_return_an_array():
    q, k, v = arrays()
    with raises(TypeError, "bias", "numpy array", "float"):
        uniattn.attention(q, k, v, bias=lambda i, j: 0.5)


def test_callable_results_are_checked():
    q, k, v = arrays()  # 4 heads, 2 kv heads, q_len 10, kv_len 12
    with raises(TypeError, r"result of mask\(q_idx, k_idx\)", "bool", "int32"):
        uniattn.attention(q, k, v, mask=lambda i, j: j - i)
    with raises(TypeError, r"result of bias\(q_idx, k_idx\)", "floating", "bool"):
        uniattn.attention(q, k, v, bias=lambda i, j: j > i)
    with raises(ValueError, r"result of bias\(q_idx, k_idx\)", "broadcastable", r"\(3, 1, 1\)"):
        uniattn.attention(q, k, v, bias=lambda i, j: np.zeros((3, 1, 1)))
    with raises(ValueError, r"result of mask\(q_idx, k_idx\)", r"\[\*batch, heads, q_len"):
        # an n x n mask is not a chunk's: [*batch, heads, q_chunk, k_chunk] is (2, 4, 4, 12)
        full = np.ones((2, 4, 10, 12), bool)
        uniattn.attention(q, k, v, mask=lambda i, j: full, query_chunk_size=4)


def test_callable_receives_chunk_positions():
    """The callable sees int32 positions [q_chunk, 1] and [1, k_chunk] of the backend."""
    q, k, v = arrays()
    seen = []

    def bias(q_idx, k_idx):
        seen.append((q_idx.dtype, q_idx.shape, k_idx.shape, int(q_idx[0, 0]), int(k_idx[0, 0])))
        return np.zeros((1, 1), np.float32)

    uniattn.attention(q, k, v, bias=bias, query_chunk_size=4, key_chunk_size=5)
    assert {s[:3] for s in seen} == {(np.dtype(np.int32), (4, 1), (1, 5))}
    # row blocks start at 0, 4 and 6 (the last one ends at q_len 10); key chunks at 0, 5, 7
    assert {s[3] for s in seen} == {0, 4, 6} and {s[4] for s in seen} == {0, 5, 7}


def self_attention(length=10):
    return arrays((2, length, 4, 8), (2, length, 2, 8))


@pytest.mark.parametrize("causal", ["top-left", "TOP_LEFT", ""])
def test_causal_strings(causal):
    q, k, v = arrays()
    with raises(ValueError, "causal", "bottom_right", "top_left", repr(causal)):
        uniattn.attention(q, k, v, causal=causal)


def test_causal_type():
    q, k, v = arrays()
    with raises(TypeError, "causal", "int"):
        uniattn.attention(q, k, v, causal=1)


def test_segment_ids_dtype_and_shape():
    q, k, v = self_attention()
    with raises(TypeError, "segment_ids", "integer", "float64"):
        uniattn.attention(q, k, v, segment_ids=np.zeros((2, 10)))
    with raises(ValueError, "segment_ids", r"\(2, 10\)", r"\(2, 9\)"):
        uniattn.attention(q, k, v, segment_ids=np.zeros((2, 9), np.int32))
    q, k, v = arrays()  # q_len 10, kv_len 12: one array cannot serve both
    with raises(ValueError, "segment_ids", "self-attention", r"\(2, 12\)"):
        uniattn.attention(q, k, v, segment_ids=np.zeros((2, 10), np.int32))
    with raises(ValueError, r"segment_ids\[1\]", r"\(2, 12\)", r"\(2, 10\)"):
        ids = np.zeros((2, 10), np.int32)
        uniattn.attention(q, k, v, segment_ids=(ids, ids))
    with raises(ValueError, "segment_ids", "pair"):
        uniattn.attention(q, k, v, segment_ids=(np.zeros((2, 10), np.int32),))


def test_segment_ids_framework():
    torch = pytest.importorskip("torch", reason="needs a second framework")
    q, k, v = self_attention()
    with raises(TypeError, "one framework", "q_segment_ids is a torch"):
        uniattn.attention(q, k, v, segment_ids=torch.zeros(2, 10, dtype=torch.int32))


def test_sinks():
    q, k, v = arrays()
    with raises(ValueError, "sinks", r"\[\*batch, heads\]", r"\(2, 4\)", r"\(3,\)"):
        uniattn.attention(q, k, v, sinks=np.zeros(3, np.float32))
    with raises(TypeError, "sinks", "floating", "int64"):
        uniattn.attention(q, k, v, sinks=np.zeros(4, np.int64))


@pytest.mark.parametrize("softcap", [0.0, -1.0, float("inf"), float("nan")])
def test_softcap_value(softcap):
    q, k, v = arrays()
    with raises(ValueError, "softcap", "> 0"):
        uniattn.attention(q, k, v, softcap=softcap)


def test_softcap_type():
    q, k, v = arrays()
    with raises(TypeError, "softcap", "str"):
        uniattn.attention(q, k, v, softcap="30")


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_dropout_rate_range(rate):
    q, k, v = arrays()
    with raises(ValueError, "dropout_rate", r"\[0, 1\)", str(rate)):
        uniattn.attention(q, k, v, dropout_rate=rate, dropout_seed=0)


def test_dropout_needs_a_seed():
    q, k, v = arrays()
    with raises(ValueError, "dropout_seed", "0.1"):
        uniattn.attention(q, k, v, dropout_rate=0.1)


@pytest.mark.parametrize("seed", [1.5, np.float32(2.0), np.zeros((), np.float32), True, "7"])
def test_dropout_seed_type(seed):
    q, k, v = arrays()
    with raises(TypeError, "dropout_seed", "int"):
        uniattn.attention(q, k, v, dropout_rate=0.1, dropout_seed=seed)


def test_dropout_seed_shape():
    q, k, v = arrays()
    with raises(TypeError, "dropout_seed", "0-d", r"\(2,\)"):
        uniattn.attention(q, k, v, dropout_rate=0.1, dropout_seed=np.zeros(2, np.int32))


def test_cu_seqlens_helper_errors():
    with raises(TypeError, "cu_seqlens", "integer", "float64"):
        uniattn.segment_ids_from_cu_seqlens(np.zeros(3), 4)
    with raises(ValueError, "cu_seqlens", r"\[documents \+ 1\]", r"\(2, 2\)"):
        uniattn.segment_ids_from_cu_seqlens(np.zeros((2, 2), np.int32), 4)
    with raises(ValueError, "length", "-1"):
        uniattn.segment_ids_from_cu_seqlens(np.zeros(2, np.int32), -1)
