"""Agreement with the frameworks' own attention on the semantics they share.

Each test runs when its peer is installed and its backend selected:
torch ``scaled_dot_product_attention`` (bool mask, ``enable_gqa``, ``is_causal``,
``causal_lower_right``), ``jax.nn.dot_product_attention`` (``is_causal``, sequence
lengths, ``local_window_size``, grouped heads) and ``keras.ops.dot_product_attention``
on each Keras backend (one subprocess per backend: Keras picks it at import).

The peers' ``is_causal`` is aligned top-left, uniattn's ``causal=True`` bottom-right: they
agree when ``q_len == kv_len``; uniattn's ``causal="top_left"`` is compared with them at
``q_len < kv_len`` too. A row that sees no key is 0
in uniattn; jax returns the mean of V there and SDPA NaN, so those rows are compared to
the reference only (see docs/semantics.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import uniattn
from uniattn import reference

from .tolerances import assert_close

B, T, S, H, KV, D = 2, 40, 56, 8, 2, 16


def _inputs(q_len=T, kv_len=S, seed=0):
    """float32-exact NumPy inputs in layout BTHD and a mask with no empty row."""
    rng = np.random.default_rng(seed)
    q, k, v = (
        rng.standard_normal(s).astype(np.float32)
        for s in ((B, q_len, H, D), (B, kv_len, KV, D), (B, kv_len, KV, D))
    )
    mask = rng.random((B, H, q_len, kv_len)) < 0.7
    mask[..., 0] = True  # every row sees at least one key: the peers' empty rows differ
    return q, k, v, mask


def _only(backend, name):
    if backend.name != name:
        pytest.skip(f"this peer is {name}'s")


# -- torch ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant", ["mask-gqa", "is-causal", "causal-lower-right", "top-left-q-shorter"]
)
def test_torch_sdpa(backend, variant):
    _only(backend, "torch")
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.bias import causal_lower_right

    q_len = S if variant == "is-causal" else T
    *qkv, mask = _inputs(q_len)
    q, k, v = (torch.from_numpy(np.swapaxes(a, 1, 2).copy()) for a in qkv)  # BHTD
    mask = torch.from_numpy(mask)
    primals = [x.clone().requires_grad_() for x in (q, k, v)]
    ours, theirs = {"layout": "BHTD"}, {"enable_gqa": True}
    if variant == "mask-gqa":
        ours["mask"] = theirs["attn_mask"] = mask
    elif variant == "is-causal":
        ours["causal"] = theirs["is_causal"] = True
    elif variant == "top-left-q-shorter":  # SDPA's is_causal with q_len < kv_len
        ours["causal"], theirs["is_causal"] = "top_left", True
    else:  # bottom-right causal with q_len < kv_len
        ours["causal"] = True
        theirs["attn_mask"] = causal_lower_right(q_len, S)
        theirs.pop("enable_gqa")  # CausalBias does not take it: repeat the heads
        primals_sdpa = [primals[0], *(x.repeat_interleave(H // KV, dim=1) for x in primals[1:])]
    out = uniattn.attention(*primals, **ours)
    sdpa_in = primals_sdpa if variant == "causal-lower-right" else primals
    expected = F.scaled_dot_product_attention(*sdpa_in, **theirs)
    assert_close(out.detach().numpy(), expected.detach().numpy(), "float32", what="vs SDPA")
    d_out = torch.randn_like(out)
    ours_g = torch.autograd.grad(out, primals, d_out)
    theirs_g = torch.autograd.grad(expected, primals, d_out)
    for name, a, b in zip("qkv", ours_g, theirs_g, strict=True):
        assert_close(a.numpy(), b.numpy(), "float32", what=f"d{name} vs SDPA")


# -- jax --------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["is-causal", "seq-lengths", "local-window", "mask"])
def test_jax_dot_product_attention(backend, variant):
    _only(backend, "jax")
    import jax
    import jax.numpy as jnp

    q_len = S if variant in ("is-causal", "local-window") else T
    q, k, v, mask = (jnp.asarray(a) for a in _inputs(q_len))
    ours, theirs, valid = {}, {}, np.ones((B, q_len), bool)
    if variant == "is-causal":
        ours["causal"] = theirs["is_causal"] = True
    elif variant == "seq-lengths":
        q_lengths, k_lengths = np.array([T, 13], np.int32), np.array([S, 29], np.int32)
        ours.update(query_lengths=jnp.asarray(q_lengths), key_lengths=jnp.asarray(k_lengths))
        theirs.update(query_seq_lengths=ours["query_lengths"])
        theirs.update(key_value_seq_lengths=ours["key_lengths"])
        valid = np.arange(q_len)[None, :] < q_lengths[:, None]
    elif variant == "local-window":
        ours["window"] = theirs["local_window_size"] = (5, 3)
    else:
        ours["mask"], theirs["mask"] = mask, mask
    out = np.asarray(uniattn.attention(q, k, v, **ours))
    expected = np.asarray(jax.nn.dot_product_attention(q, k, v, **theirs))
    assert_close(out[valid], expected[valid], "float32", what="vs jax.nn.dot_product_attention")
    # Padded query rows: uniattn gives 0, jax does not (the difference README states).
    assert not out[~valid].any()

    def loss(fn, **kw):
        return lambda *a: jnp.sum(jnp.where(valid[:, :, None, None], fn(*a, **kw), 0.0) ** 2)

    ours_g = jax.grad(loss(uniattn.attention, **ours), argnums=(0, 1, 2))(q, k, v)
    theirs_g = jax.grad(loss(jax.nn.dot_product_attention, **theirs), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", ours_g, theirs_g, strict=True):
        assert_close(np.asarray(a), np.asarray(b), "float32", what=f"d{name} vs jax")


# -- keras ------------------------------------------------------------------------------

_KERAS_SCRIPT = """
import json, sys
import numpy as np
import keras
q, k, v, mask = (np.load(sys.argv[1])[n] for n in ("q", "k", "v", "mask"))
ops = keras.ops
out = {
    "plain": ops.dot_product_attention(q, k, v),
    "is-causal": ops.dot_product_attention(q, k[:, :40], v[:, :40], is_causal=True),
    "mask": ops.dot_product_attention(q, k, v, mask=mask),
    "scale": ops.dot_product_attention(q, k, v, scale=0.3),
}
np.savez(sys.argv[2], **{n: ops.convert_to_numpy(x) for n, x in out.items()})
print(json.dumps({"keras": keras.__version__, "backend": keras.backend.backend()}))
"""


@pytest.mark.parametrize("keras_backend", ["jax", "torch", "tensorflow"])
def test_keras_dot_product_attention(backend, keras_backend, tmp_path):
    """Keras 3 on each of its backends, against uniattn on that backend's arrays."""
    _only(backend, keras_backend)
    pytest.importorskip("keras", reason="Keras is the peer here")
    q, k, v, mask = _inputs()
    np.savez(tmp_path / "in.npz", q=q, k=k, v=v, mask=mask)
    env = {**os.environ, "KERAS_BACKEND": keras_backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    run = subprocess.run(
        [sys.executable, "-c", _KERAS_SCRIPT, str(tmp_path / "in.npz"), str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1])["backend"] == keras_backend
    theirs = np.load(tmp_path / "out.npz")
    arrays = [backend.asarray(a) for a in (q, k, v)]
    calls = {
        "plain": (arrays, {}),
        "is-causal": ([arrays[0], backend.asarray(k[:, :40]), backend.asarray(v[:, :40])], {}),
        "mask": (arrays, {"mask": backend.asarray(mask)}),
        "scale": (arrays, {"scale": 0.3}),
    }
    calls["is-causal"][1]["causal"] = True
    for name, (args, kwargs) in calls.items():
        ours = backend.to_numpy(uniattn.attention(*args, **kwargs))
        assert_close(ours, theirs[name], "float32", what=f"vs keras ({keras_backend}) {name}")
        expected = reference.attention(
            *(np.asarray(backend.to_numpy(a), np.float64) for a in args),
            **{kk: backend.to_numpy(x) if kk == "mask" else x for kk, x in kwargs.items()},
        )
        assert_close(ours, expected, "float32", what=f"{name} vs reference")
