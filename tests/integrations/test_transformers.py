"""uniattn as a transformers attention implementation, on tiny randomly initialised models
(no download): logits, gradients and greedy decoding against transformers' eager attention.

float64 comparisons lift transformers' float32 casts (see ``_float64_throughout``); float32
comparisons run transformers untouched and use the float32 row of the tolerance table.
"""

from __future__ import annotations

import inspect

import pytest

torch = pytest.importorskip("torch", reason="transformers models run on PyTorch")
transformers = pytest.importorskip(
    "transformers", reason="the transformers integration needs transformers (uniattn[transformers])"
)

import uniattn  # noqa: E402
from conformance.tolerances import TOLERANCES, relative_error  # noqa: E402
from uniattn.integrations import transformers as uniattn_hf  # noqa: E402

if tuple(int(p) for p in transformers.__version__.split(".")[:2]) < uniattn_hf.MIN_VERSION:
    pytest.skip(
        f"transformers {transformers.__version__} predates the mask interface (4.53)",
        allow_module_level=True,
    )

from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    Gemma2Config,
    GptOssConfig,
    LlamaConfig,
    MistralConfig,
    masking_utils,
)

NAME = uniattn_hf.register()
BATCH, LENGTH, PAD = 2, 16, 5  # row 0 has PAD padding tokens on the left
WINDOW = 5
COMMON = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped: two query heads per key/value head
    head_dim=8,
    vocab_size=100,
    max_position_embeddings=64,
    pad_token_id=0,
)
CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=WINDOW),
    "gemma2": lambda: Gemma2Config(
        **COMMON, sliding_window=WINDOW, attn_logit_softcapping=2.0, query_pre_attn_scalar=16
    ),
    "gpt_oss": lambda: GptOssConfig(
        **COMMON, sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2
    ),
}
MODELS = list(CONFIGS)


def _model(name: str, dtype=torch.float64, implementation: str = "eager", **overrides):
    """A random model whose attention is far from uniform: scores of order 10 (so that
    soft-capping at 2 bites and a wrong mask shows) and sinks of order 1."""
    config = CONFIGS[name]()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    extra = {"experts_implementation": "eager"} if name == "gpt_oss" else {}
    model = AutoModelForCausalLM.from_config(config, attn_implementation=implementation, **extra)
    with torch.no_grad():
        for layer in model.model.layers:
            attention = layer.self_attn
            attention.q_proj.weight.mul_(20)
            attention.k_proj.weight.mul_(20)
            if hasattr(attention, "sinks"):
                attention.sinks.normal_()
    return model.to(dtype)


def _inputs():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (BATCH, LENGTH), generator=generator)
    mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    mask[0, :PAD] = 0
    ids[0, :PAD] = 0
    return ids, mask


@pytest.fixture
def float64_throughout(monkeypatch):
    """transformers computes in float32 inside float64 models: RMSNorm upcasts to float32,
    eager attention takes its softmax in float32 (where finfo(float64).min becomes -inf, so
    padded rows turn NaN and the NaN spreads to every row of the next layer). Lift those
    casts, for both implementations alike, so that a float64 comparison measures attention
    rather than float32 rounding."""
    to, to_float, softmax = torch.Tensor.to, torch.Tensor.float, torch.nn.functional.softmax

    def lifted_to(self, *args, **kwargs):
        if self.dtype == torch.float64:
            args = tuple(torch.float64 if a is torch.float32 else a for a in args)
            if kwargs.get("dtype") is torch.float32:
                kwargs["dtype"] = torch.float64
        return to(self, *args, **kwargs)

    def lifted_float(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else to_float(self, *args, **kwargs)

    def lifted_softmax(input, *args, dtype=None, **kwargs):
        if dtype is torch.float32 and input.dtype == torch.float64:
            dtype = torch.float64
        return softmax(input, *args, dtype=dtype, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", lifted_to)
    monkeypatch.setattr(torch.Tensor, "float", lifted_float)
    monkeypatch.setattr(torch.nn.functional, "softmax", lifted_softmax)


@pytest.fixture
def calls(monkeypatch):
    """The keywords of every ``uniattn.attention`` call."""
    seen = []
    attention = uniattn.attention

    def spy(query, key, value, **keywords):
        seen.append(keywords)
        return attention(query, key, value, **keywords)

    monkeypatch.setattr(uniattn, "attention", spy)
    return seen


def _logits_and_gradients(model, ids, mask, implementation):
    model.set_attn_implementation(implementation)
    model.zero_grad()
    logits = model(ids, attention_mask=mask).logits
    weights = torch.linspace(-1, 1, logits.shape[-1], dtype=logits.dtype)
    valid = mask.bool()
    (logits[valid] * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach()[valid], grads


@pytest.mark.parametrize("name", MODELS)
def test_float64_logits_and_gradients_equal_eager(name, float64_throughout, calls):
    model = _model(name)
    ids, mask = _inputs()
    expected, expected_grads = _logits_and_gradients(model, ids, mask, "eager")
    assert not calls
    actual, grads = _logits_and_gradients(model, ids, mask, NAME)
    assert len(calls) == model.config.num_hidden_layers
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)
    assert grads.keys() == expected_grads.keys()
    assert len(grads) == len(list(model.parameters()))  # sinks included
    scale = max(g.abs().max() for g in expected_grads.values())
    for param, grad in grads.items():
        torch.testing.assert_close(
            grad, expected_grads[param], rtol=1e-9, atol=1e-10 * scale, msg=param
        )


@pytest.mark.parametrize("name", MODELS)
def test_float32_logits_match_eager_within_the_tolerance_table(name):
    model = _model(name, torch.float32)
    ids, mask = _inputs()
    valid = mask.bool()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits[valid]
        model.set_attn_implementation(NAME)
        actual = model(ids, attention_mask=mask).logits[valid]
    assert relative_error(actual.numpy(), expected.numpy()) <= TOLERANCES["float32"].forward


@pytest.mark.parametrize("name", MODELS)
def test_greedy_generation_with_a_kv_cache_equals_eager(name, float64_throughout, calls):
    model = _model(name)
    ids, mask = _inputs()
    new = 6  # past the sliding window: the sliding layers' caches drop their oldest keys
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
    model.set_attn_implementation(NAME)
    actual = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
    assert actual.shape == (BATCH, LENGTH + new)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    decoding = [c for c in calls if "causal" in c or "segment_ids" in c]
    assert len(calls) == new * model.config.num_hidden_layers and decoding


def _cache_argument(model):
    """The forward's cache argument: ``cache`` from transformers 5.x, ``past_key_values``
    before."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def test_a_few_queries_after_a_cache_equal_eager(float64_throughout):
    """Prefill, then three tokens at once against the cache (as speculative decoding
    verifies them): uniattn's bottom-right causal diagonal is the cache's."""
    model = _model("llama")
    ids, mask = _inputs()
    logits = {}
    for implementation in ("eager", NAME):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            first = model(ids[:, :12], attention_mask=mask[:, :12], use_cache=True)
            then = model(
                ids[:, 12:15],
                attention_mask=mask[:, :15],
                use_cache=True,
                **{_cache_argument(model): first.past_key_values},
            )
        logits[implementation] = then.logits
    torch.testing.assert_close(logits[NAME], logits["eager"], rtol=1e-10, atol=1e-10)


def test_static_cache_decoding_equals_eager(float64_throughout, calls):
    """A static cache's keys run past the queries (empty slots): the causal diagonal is
    not uniattn's bottom-right one, so the mask goes through as a per-chunk callable."""
    model = _model("llama")
    ids, mask = _inputs()
    kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=False)
    expected = model.generate(ids, cache_implementation="static", **kwargs)
    model.set_attn_implementation(NAME)
    actual = model.generate(ids, cache_implementation="static", **kwargs)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    # Every step but the last (which fills the cache) has empty slots after the queries.
    per_step = model.config.num_hidden_layers
    assert all(callable(c.get("mask")) for c in calls[:-per_step])
    assert all(c.get("causal") is True for c in calls[-per_step:])


def _window(config, index):
    kinds = getattr(config, "layer_types", None)
    if kinds is not None:
        return WINDOW if kinds[index] == "sliding_attention" else None
    return getattr(config, "sliding_window", None)


def test_uniattn_is_called_with_structure_not_a_dense_mask(calls):
    """Padding, causality and sliding windows reach uniattn as segment ids, flags and a
    window; no q_len x kv_len array is passed."""
    ids, mask = _inputs()
    for name in MODELS:
        calls.clear()
        model = _model(name, implementation=NAME)
        with torch.no_grad():
            model(ids, attention_mask=mask)
        assert len(calls) == model.config.num_hidden_layers, name
        sliding = [_window(model.config, i) for i in range(len(calls))]
        for call, window in zip(calls, sliding, strict=True):
            assert "mask" not in call and "bias" not in call, name
            assert call["causal"] is True and call["layout"] == "BHTD"
            assert call.get("window") == (None if window is None else (window - 1, None)), name
            q_ids, kv_ids = call["segment_ids"]
            assert q_ids.shape == kv_ids.shape == (BATCH, LENGTH)
            torch.testing.assert_close(kv_ids, torch.where(mask.bool(), 0, -1).int())
        first = model.model.layers[0].self_attn
        if name == "gemma2":
            assert calls[0]["softcap"] == 2.0 and calls[0]["scale"] == first.scaling
        if name == "gpt_oss":
            assert calls[0]["sinks"] is first.sinks


def test_packed_documents_become_segment_ids(float64_throughout, calls):
    """Documents packed into one row (positions restart, no attention mask), as
    transformers' flattening collator makes them: causal attention within each document."""
    model = _model("llama")
    ids, _ = _inputs()
    positions = torch.cat([torch.arange(6), torch.arange(10)])[None].expand(BATCH, -1)
    logits = {}
    for implementation in ("eager", NAME):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            logits[implementation] = model(ids, position_ids=positions, use_cache=False).logits
    torch.testing.assert_close(logits[NAME], logits["eager"], rtol=1e-10, atol=1e-10)
    q_ids, kv_ids = calls[0]["segment_ids"]
    assert "mask" not in calls[0] and calls[0]["causal"] is True
    assert q_ids[0].tolist() == kv_ids[0].tolist() == [0] * 6 + [1] * 10


# The attention and mask functions called directly, as transformers calls them.


class _Layer(torch.nn.Module):
    def __init__(self, is_causal=True):
        super().__init__()
        self.is_causal = is_causal


def _qkv(q_len=7, kv_len=7, heads=4, kv_heads=2, d=8, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    return draw(2, heads, q_len, d), draw(2, kv_heads, kv_len, d), draw(2, kv_heads, kv_len, d)


def _sdpa(q, k, v, mask=None, is_causal=False, scale=None):
    """float64 reference: torch's own attention (math path), keys repeated."""
    groups = q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(groups, dim=1) for x in (k, v))
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale
    )
    return out.transpose(1, 2)


def _mask_call(mask_function, q_len, kv_len, q_offset=0, kv_offset=0, padding=None, **kw):
    return dict(
        batch_size=2,
        q_length=q_len,
        kv_length=kv_len,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=padding,
        device="cpu",
        **kw,
    )


def _dense(call):
    call = {**call, "allow_is_causal_skip": False, "allow_is_bidirectional_skip": False}
    return masking_utils.sdpa_mask(**call)


def test_a_mask_function_it_does_not_recognise_is_evaluated_per_chunk():
    def every_third(batch_idx, head_idx, q_idx, kv_idx):
        return (q_idx - kv_idx) % 3 == 0

    function = masking_utils.or_masks(masking_utils.sliding_window_overlay(2), every_third)
    function = masking_utils.and_masks(masking_utils.causal_mask_function, function)
    padding = torch.ones(2, 10, dtype=torch.bool)
    padding[1, :2] = False
    call = _mask_call(function, 7, 10, q_offset=3, padding=padding)
    structured = uniattn_hf.create_mask(**call)
    assert structured.pattern is None and structured.dense is None
    q, k, v = _qkv(7, 10)
    out, weights = uniattn_hf.attention_forward(_Layer(), q, k, v, structured, scaling=0.3)
    assert weights is None
    torch.testing.assert_close(out, _sdpa(q, k, v, _dense(call), scale=0.3))


def test_a_mask_function_transformers_vmaps_is_materialised():
    function = masking_utils.and_masks(
        masking_utils.causal_mask_function, lambda b, h, q, kv: q != kv + 1
    )
    call = _mask_call(function, 7, 7, use_vmap=True)
    structured = uniattn_hf.create_mask(**call)
    assert structured.dense is not None and structured.dense.dtype == torch.bool
    q, k, v = _qkv()
    out, _ = uniattn_hf.attention_forward(_Layer(), q, k, v, structured)
    torch.testing.assert_close(out, _sdpa(q, k, v, _dense(call)))


@pytest.mark.parametrize(
    "offsets",
    [(0, 0, 7, 7), (9, 0, 3, 12), (9, 6, 3, 6), (4, 0, 3, 10)],
    ids=["prefill", "cache", "sliding-cache", "static-cache"],
)
def test_recognised_patterns_equal_transformers_dense_mask(offsets):
    """Structure where the last query and the last key are one token (uniattn's causal
    diagonal is then transformers'); a per-chunk callable where a static cache's empty
    slots follow the queries."""
    q_offset, kv_offset, q_len, kv_len = offsets
    aligned = q_offset + q_len == kv_offset + kv_len
    padding = torch.ones(2, kv_offset + kv_len, dtype=torch.bool)
    padding[0, :4] = False
    q, k, v = _qkv(q_len, kv_len)
    bidi = masking_utils.bidirectional_mask_function
    for function in (
        masking_utils.causal_mask_function,
        masking_utils.sliding_window_causal_mask_function(4),
        bidi,
    ):
        call = _mask_call(function, q_len, kv_len, q_offset, kv_offset, padding)
        structured = uniattn_hf.create_mask(**call)
        assert structured.pattern is not None
        keywords = structured.keywords(2, q_len, kv_len, q.device)
        assert callable(keywords.get("mask")) == (not aligned and function is not bidi)
        dense = _dense(call)
        out, _ = uniattn_hf.attention_forward(_Layer(), q, k, v, structured)
        expected = _sdpa(q, k, v, dense)
        rows = dense.any(-1)[:, 0]  # rows that see no key: uniattn gives 0, torch NaN
        torch.testing.assert_close(out[rows], expected[rows])
        assert not out[~rows].any()


def test_the_transformers_4_call_convention_gives_the_same_mask():
    """Before 5.0 transformers passed the query positions as ``cache_position``."""
    padding = torch.ones(2, 12, dtype=torch.bool)
    padding[0, :3] = False
    function = masking_utils.sliding_window_causal_mask_function(4)
    new = uniattn_hf.create_mask(**_mask_call(function, 3, 12, q_offset=9, padding=padding))
    old = _mask_call(function, 3, 12, padding=padding)
    del old["q_length"], old["q_offset"]
    old = uniattn_hf.create_mask(**old, cache_position=torch.arange(9, 12))
    q, k, v = _qkv(3, 12)
    for a, b in ((new, old),):
        torch.testing.assert_close(
            uniattn_hf.attention_forward(_Layer(), q, k, v, a)[0],
            uniattn_hf.attention_forward(_Layer(), q, k, v, b)[0],
        )
    assert (old.q_offset, old.pattern.left, old.q_positions) == (9, 3, None)


def test_a_dense_4d_mask_is_passed_as_mask_or_bias():
    q, k, v = _qkv()
    keep = torch.rand(2, 1, 7, 7, generator=torch.Generator().manual_seed(3)) > 0.3
    keep |= torch.eye(7, dtype=torch.bool)
    expected = _sdpa(q, k, v, keep)
    out, _ = uniattn_hf.attention_forward(_Layer(), q, k, v, keep)
    torch.testing.assert_close(out, expected)
    additive = torch.zeros(keep.shape, dtype=torch.float64)
    additive[~keep] = torch.finfo(torch.float64).min
    out, _ = uniattn_hf.attention_forward(_Layer(), q, k, v, additive)
    torch.testing.assert_close(out, expected)


def test_no_mask_is_causal_per_the_layer_and_windowed_per_sliding_window():
    q, k, v = _qkv(3, 9)
    out, _ = uniattn_hf.attention_forward(_Layer(), q, k, v, None)
    bottom_right = torch.arange(9)[None] <= torch.arange(3)[:, None] + 6
    torch.testing.assert_close(out, _sdpa(q, k, v, bottom_right))
    out, _ = uniattn_hf.attention_forward(_Layer(is_causal=False), q, k, v, None)
    torch.testing.assert_close(out, _sdpa(q, k, v))
    out, _ = uniattn_hf.attention_forward(_Layer(), q, k, v, None, sliding_window=3)
    window = bottom_right & (torch.arange(9)[None] > torch.arange(3)[:, None] + 6 - 3)
    torch.testing.assert_close(out, _sdpa(q, k, v, window))


def test_softcap_sinks_and_scaling_reach_uniattn():
    q, k, v = _qkv()
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    out, _ = uniattn_hf.attention_forward(
        _Layer(), q, k, v, None, scaling=0.7, softcap=1.5, s_aux=sinks
    )
    expected = uniattn.attention(
        q, k, v, layout="BHTD", causal=True, scale=0.7, softcap=1.5, sinks=sinks
    )
    torch.testing.assert_close(out, expected.transpose(1, 2), rtol=0, atol=0)


def test_dropout_while_training_is_seeded_from_torch():
    q, k, v = _qkv()
    layer = _Layer().train()
    torch.manual_seed(5)
    out, _ = uniattn_hf.attention_forward(layer, q, k, v, None, dropout=0.4)
    torch.manual_seed(5)
    again, _ = uniattn_hf.attention_forward(layer, q, k, v, None, dropout=0.4)
    torch.manual_seed(5)
    seed = torch.randint(0, 2**32, (), dtype=torch.int64)
    expected = uniattn.attention(
        q, k, v, layout="BHTD", causal=True, dropout_rate=0.4, dropout_seed=seed
    )
    torch.testing.assert_close(out, expected.transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(again, out, rtol=0, atol=0)
    other, _ = uniattn_hf.attention_forward(layer, q, k, v, None, dropout=0.4)
    assert not torch.equal(other, out)
    plain, _ = uniattn_hf.attention_forward(layer.eval(), q, k, v, None, dropout=0.4)
    torch.testing.assert_close(plain, _sdpa(q, k, v, is_causal=True))


def test_a_model_trains_with_attention_dropout():
    model = _model("llama", implementation=NAME, attention_dropout=0.3).train()
    ids, mask = _inputs()
    losses = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        model.zero_grad()
        loss = model(ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == losses[1] != losses[2]
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


def test_register_installs_both_functions_under_the_name():
    from transformers import AttentionInterface

    assert uniattn_hf.register("uniattn-test") == "uniattn-test"
    assert AttentionInterface._global_mapping["uniattn-test"] is uniattn_hf.attention_forward
    mapping = masking_utils.AttentionMaskInterface._global_mapping
    assert mapping["uniattn-test"] is uniattn_hf.create_mask
    model = _model("llama", implementation="uniattn-test")
    assert model.config._attn_implementation == "uniattn-test"
    model.set_attn_implementation("eager")
    model.set_attn_implementation("uniattn-test")
    assert model.config._attn_implementation == "uniattn-test"


def test_register_refuses_a_bad_name():
    with pytest.raises(ValueError, match="eager"):
        uniattn_hf.register("eager")
    with pytest.raises(TypeError, match="name must be a str"):
        uniattn_hf.register(3)


def test_output_attentions_raises_naming_the_option():
    model = _model("llama", implementation=NAME)
    ids, mask = _inputs()
    with pytest.raises(ValueError, match="output_attentions=True"):
        model(ids, attention_mask=mask, output_attentions=True)


def test_head_mask_and_bad_masks_raise():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="head_mask"):
        uniattn_hf.attention_forward(_Layer(), q, k, v, None, head_mask=torch.ones(4))
    with pytest.raises(ValueError, match="4-D tensor"):
        uniattn_hf.attention_forward(_Layer(), q, k, v, torch.ones(2, 7, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"StructuredMask, a torch\.Tensor or None"):
        uniattn_hf.attention_forward(_Layer(), q, k, v, [[1]])


def test_a_bidirectional_encoder_with_right_padding_matches_eager():
    """An encoder (BERT): no causal mask, padding keys masked."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        vocab_size=100,
    )  # fmt: skip
    torch.manual_seed(0)
    model = BertModel._from_config(config, attn_implementation="eager").eval()
    ids, _ = _inputs()
    mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    mask[1, -PAD:] = 0
    valid = mask.bool()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).last_hidden_state[valid]
        model.set_attn_implementation(NAME)
        actual = model(ids, attention_mask=mask).last_hidden_state[valid]
    assert relative_error(actual.numpy(), expected.numpy()) <= TOLERANCES["float32"].forward


def test_register_says_what_is_missing_or_too_old(monkeypatch):
    import sys

    # The module ``import transformers`` finds now (transformers may have replaced its lazy
    # module in sys.modules since this file imported it).
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.52.4")
    with pytest.raises(ImportError, match=r"transformers >= 4\.53.*found 4\.52\.4"):
        uniattn_hf.register("too-old")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install 'uniattn\[transformers\]'"):
        uniattn_hf.register("missing")
