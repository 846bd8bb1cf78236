"""Checks of uniattn.integrations.keras on the Keras backend KERAS_BACKEND names.

Run by test_keras.py, once per backend, in a process of its own (Keras reads the backend
when it is first imported): ``KERAS_BACKEND=jax python tests/integrations/keras_checks.py
TMPDIR``. Each check compares with Keras's own op or layer on the same weights; an
assertion fails the process.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

import uniattn  # noqa: E402
from conformance.tolerances import assert_close, assert_gradients_close  # noqa: E402
from uniattn import reference  # noqa: E402
from uniattn.integrations import keras as uk  # noqa: E402

BACKEND = keras.backend.backend()
RNG = np.random.default_rng(0)

#: (query rank, query heads, key heads) of each uniattn.attention call: proof that
#: uniattn computes, and that grouped-query attention reaches it without repeated keys.
CALLS = []
_attention = uniattn.attention


def _recorded(query, key, value, **kwargs):
    CALLS.append((len(query.shape), query.shape[-2], key.shape[-2]))
    return _attention(query, key, value, **kwargs)


uniattn.attention = _recorded


def normal(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def close(got, want, what):
    assert_close(numpy(got), numpy(want), "float32", what=f"{BACKEND}: {what}")


def raises(error, match, fn):
    try:
        fn()
    except error as e:
        assert match in str(e), f"{match!r} not in {e}"
        return
    raise AssertionError(f"{BACKEND}: no {error.__name__} mentioning {match}")


def check_op():
    """uk.dot_product_attention against keras.ops.dot_product_attention."""
    q, k, v = normal(2, 5, 4, 8), normal(2, 7, 2, 8), normal(2, 7, 2, 8)
    mask = RNG.random((2, 1, 5, 7)) > 0.4
    mask[0, 0, 1] = False  # a row that attends no key
    bias = normal(1, 4, 5, 7)
    for what, kwargs in [
        ("grouped kv heads, causal with T < S (top left)", {"is_causal": True}),
        ("mask", {"mask": mask}),
        ("causal and mask", {"is_causal": True, "mask": mask}),
        ("bias and scale", {"bias": bias, "scale": 0.3}),  # torch's takes no mask with a bias
    ]:
        close(
            uk.dot_product_attention(q, k, v, **kwargs),
            ops.dot_product_attention(q, k, v, **kwargs),
            what,
        )
    # attn_logits_soft_cap: Keras's op has it on TPU only; uniattn's float64 reference
    want = reference.attention(q, k, v, softcap=2.0, causal="top_left")
    close(
        uk.dot_product_attention(q, k, v, attn_logits_soft_cap=2.0, is_causal=True), want, "softcap"
    )
    raises(
        ValueError,
        "flash_attention",
        lambda: uk.dot_product_attention(q, k, v, flash_attention=True),
    )
    # Symbolic tensors: the op in a functional model
    inputs = [keras.Input(x.shape[1:]) for x in (q, k, v)]
    model = keras.Model(inputs, uk.dot_product_attention(*inputs, is_causal=True))
    close(model([q, k, v]), ops.dot_product_attention(q, k, v, is_causal=True), "functional")


def same_layers(make_keras, make_ours, *inputs):
    ref, ours = make_keras(), make_ours()
    ref(*inputs)
    ours(*inputs)
    ours.set_weights(ref.get_weights())
    return ref, ours


def check_layers():
    x, y = normal(2, 5, 16), normal(2, 7, 16)
    ref, ours = same_layers(
        lambda: keras.layers.MultiHeadAttention(num_heads=4, key_dim=8),
        lambda: uk.MultiHeadAttention(num_heads=4, key_dim=8),
        x,
        x,
    )
    padding = (np.arange(5) < np.array([[3], [5]]))[:, None, :]  # [B, 1, S]
    padded = padding & np.swapaxes(padding, 1, 2)  # padded queries attend no key
    cross = RNG.random((2, 5, 7)) > 0.3
    # use_causal_mask alone: check_training's models
    for what, args, kwargs in [
        ("padding", (x, x), {"attention_mask": padded}),
        ("causal and padding", (x, x), {"attention_mask": padded, "use_causal_mask": True}),
        ("cross, causal and mask", (x, y), {"attention_mask": cross, "use_causal_mask": True}),
    ]:
        CALLS.clear()
        close(ours(*args, **kwargs), ref(*args, **kwargs), f"MultiHeadAttention {what}")
        assert CALLS == [(4, 4, 4)], CALLS
    # return_attention_scores: Keras's own attention computes that call
    out, scores = ours(x, x, use_causal_mask=True, return_attention_scores=True)
    want, want_scores = ref(x, x, use_causal_mask=True, return_attention_scores=True)
    close(out, want, "scores' output")
    close(scores, want_scores, "scores")

    # Two attention axes, as for images: [B, X, Y, E]
    image = normal(2, 3, 4, 8)
    ref2, ours2 = same_layers(
        lambda: keras.layers.MultiHeadAttention(num_heads=2, key_dim=4, attention_axes=(1, 2)),
        lambda: uk.MultiHeadAttention(num_heads=2, key_dim=4, attention_axes=(1, 2)),
        image,
        image,
    )
    image_mask = RNG.random((2, 3, 4, 3, 4)) > 0.3
    close(
        ours2(image, image, attention_mask=image_mask),
        ref2(image, image, attention_mask=image_mask),
        "two attention axes, mask",
    )

    # Grouped-query attention: 4 query heads, 2 kv heads
    gref, gours = same_layers(
        lambda: keras.layers.GroupQueryAttention(
            head_dim=8, num_query_heads=4, num_key_value_heads=2
        ),
        lambda: uk.GroupQueryAttention(head_dim=8, num_query_heads=4, num_key_value_heads=2),
        x,
        x,
    )
    CALLS.clear()
    close(gours(x, y, attention_mask=cross), gref(x, y, attention_mask=cross), "GQA cross, mask")
    assert CALLS == [(4, 4, 2)], CALLS  # the two kv heads, not repeated
    out, scores = gours(x, x, attention_mask=padded, return_attention_scores=True)
    want, want_scores = gref(x, x, attention_mask=padded, return_attention_scores=True)
    close(out, want, "GQA scores' output")
    close(scores, want_scores, "GQA scores")

    # Dropout: inference equals Keras; training drops (a new mask per call)
    dref, dours = same_layers(
        lambda: keras.layers.MultiHeadAttention(num_heads=4, key_dim=8, dropout=0.5, seed=1),
        lambda: uk.MultiHeadAttention(num_heads=4, key_dim=8, dropout=0.5, seed=1),
        x,
        x,
    )
    eval_out = numpy(dours(x, x, training=False))
    close(eval_out, dref(x, x, training=False), "dropout layer, inference")
    first, second = numpy(dours(x, x, training=True)), numpy(dours(x, x, training=True))
    assert np.isfinite(first).all()
    assert not np.allclose(first, eval_out) and not np.allclose(first, second), "no dropout"

    for make in (uk.MultiHeadAttention, uk.GroupQueryAttention):
        kwargs = (
            {"num_heads": 2, "key_dim": 4}
            if make is uk.MultiHeadAttention
            else {"head_dim": 4, "num_query_heads": 2, "num_key_value_heads": 1}
        )
        raises(
            ValueError,
            "flash_attention",
            lambda make=make, kw=kwargs: make(**kw, flash_attention=True),
        )


def build_model(layers, dropout=0.0, seq=6, features=16, jit_compile="auto"):
    """Embedding-free decoder block: causal self-attention, then grouped-query attention."""
    mha = layers.MultiHeadAttention(num_heads=4, key_dim=4, dropout=dropout, seed=3)
    gqa = layers.GroupQueryAttention(
        head_dim=4, num_query_heads=4, num_key_value_heads=2, dropout=dropout, seed=4
    )
    inputs = keras.Input((seq, features))
    h = inputs + mha(inputs, inputs, use_causal_mask=True)
    h = h + gqa(h, h, use_causal_mask=True)
    outputs = keras.layers.Dense(features)(h)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", jit_compile=jit_compile)
    return model


def check_training(tmp: Path):
    x, target = normal(4, 6, 16), normal(4, 6, 16)
    ref = build_model(keras.layers)
    ours = build_model(uk)
    ours.set_weights(ref.get_weights())
    before = [numpy(w) for w in ref.get_weights()]
    # One SGD step: the same loss, and the same update (so the same gradients).
    ref_loss = float(ref.train_on_batch(x, target))
    our_loss = float(ours.train_on_batch(x, target))
    assert_close(our_loss, ref_loss, "float32", what=f"{BACKEND}: loss")
    steps = {
        str(i): (numpy(a) - b, numpy(w) - b)
        for i, (a, w, b) in enumerate(
            zip(ours.get_weights(), ref.get_weights(), before, strict=True)
        )
    }
    assert_gradients_close(
        {i: s[0] for i, s in steps.items()},
        {i: s[1] for i, s in steps.items()},
        "float32",
        what=f"{BACKEND}: one SGD step",
    )

    # model.fit with dropout: two steps, a finite loss that changes
    # With XLA on TensorFlow (its default on GPUs; "auto" is off on CPUs). Six examples
    # in batches of 4 and 2: TensorFlow traces the step again with the batch size
    # unknown, which uniattn meets one example at a time.
    model = build_model(uk, dropout=0.1, jit_compile=BACKEND == "tensorflow" or "auto")
    CALLS.clear()
    x6, target6 = normal(6, 6, 16), normal(6, 6, 16)
    losses = model.fit(x6, target6, batch_size=4, epochs=2, verbose=0).history["loss"]
    assert np.isfinite(losses).all() and losses[1] != losses[0], losses
    if BACKEND == "tensorflow":
        assert (3, 4, 4) in CALLS and (3, 4, 2) in CALLS, CALLS

    # Saving and loading keeps uniattn's layers and the outputs
    path = tmp / f"model-{BACKEND}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    kinds = {type(layer) for layer in loaded.layers}
    assert {uk.MultiHeadAttention, uk.GroupQueryAttention} <= kinds, kinds
    close(loaded(x), model(x), "loaded model")


def main():
    tmp = Path(sys.argv[1])
    for check, args in ((check_op, ()), (check_layers, ()), (check_training, (tmp,))):
        start = time.perf_counter()
        check(*args)
        print(f"{BACKEND}: {check.__name__} ok ({time.perf_counter() - start:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
