"""The case table: every backend runs every case (in each dtype it supports).

A case fixes shapes, options and a seed; :func:`make_inputs` turns it into float64 NumPy
arrays, so a failure is reproducible from the case's name alone (see :meth:`Case.repro`).
Shapes of ``bias`` and ``mask`` are written against ``[*batch, heads, q_len, kv_len]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

ALL_DTYPES = ("float64", "float32", "float16", "bfloat16")
WIDE = ("float64", "float32")


@dataclass(frozen=True)
class Case:
    name: str
    q_len: int
    kv_len: int
    batch: tuple[int, ...] = (2,)
    heads: int = 2
    kv_heads: int | None = None  # None: same as heads
    d_k: int = 8
    d_v: int | None = None  # None: same as d_k
    causal: bool | str = False  # or "bottom_right", "top_left"
    window: tuple[int | None, int | None] | None = None
    query_lengths: tuple[int, ...] | None = None  # flattened [*batch]
    key_lengths: tuple[int, ...] | None = None
    bias: tuple[int, ...] | None = None
    mask: tuple[int, ...] | None = None
    bias_fn: str | None = None  # a callable bias from CALLABLES (instead of an array)
    mask_fn: str | None = None
    masked_rows: tuple[int, ...] = ()  # query rows the mask (or a -inf bias) switches off
    # Packed documents: their lengths, the same in every batch element; positions past their
    # sum are padding (id -1). With kv_documents too, queries and keys get their own ids
    # (a pair); documents=(..) alone is one array for both (self-attention).
    documents: tuple[int, ...] | None = None
    kv_documents: tuple[int, ...] | None = None
    shuffled_ids: bool = False  # ids in random order (no skipping applies; still exact)
    sinks: tuple[int, ...] | None = None  # the sinks' shape, against [*batch, heads]
    softcap: float | None = None
    dropout_rate: float = 0.0
    dropout_seed: int = 0
    bias_minus_inf: bool = False  # -inf bias entries act as a mask (masked_rows: all -inf)
    layout: str = "BTHD"
    chunks: tuple[int, int] = (16, 16)
    scale: float | None = None
    logit_gain: float = 1.0  # multiplies q: large values stress the running max
    value_gain: float = 1.0  # multiplies v
    # Round q and k to integers: with a power-of-two scale the scores are then exact in
    # float32, so huge logits test the algorithm's stability, not matmul conditioning.
    integer_qk: bool = False
    dtypes: tuple[str, ...] = WIDE
    seed: int = 0

    @property
    def id(self) -> str:
        return self.name

    def shapes(self) -> dict[str, tuple[int, ...]]:
        kv_heads = self.kv_heads or self.heads
        d_v = self.d_v or self.d_k

        def arrange(length, heads, dim):
            core = (length, heads, dim) if self.layout == "BTHD" else (heads, length, dim)
            return (*self.batch, *core)

        return {
            "query": arrange(self.q_len, self.heads, self.d_k),
            "key": arrange(self.kv_len, kv_heads, self.d_k),
            "value": arrange(self.kv_len, kv_heads, d_v),
            "d_out": arrange(self.q_len, self.heads, d_v),
        }

    def kwargs(self) -> dict:
        """Keyword arguments of ``uniattn.attention`` (arrays not included)."""
        return dict(
            **self.semantics(),
            query_chunk_size=self.chunks[0],
            key_chunk_size=self.chunks[1],
        )

    def semantics(self) -> dict:
        """The non-array keyword arguments that :mod:`uniattn.reference` takes too."""
        dropout = {}
        if self.dropout_rate:
            dropout = dict(dropout_rate=self.dropout_rate, dropout_seed=self.dropout_seed)
        return dict(
            causal=self.causal,
            window=self.window,
            scale=self.scale,
            layout=self.layout,
            softcap=self.softcap,
            **dropout,
        )

    def with_(self, **changes) -> Case:
        return replace(self, **changes)

    def repro(self, backend: str, dtype: str) -> str:
        """How to rerun this case by hand."""
        shapes = ", ".join(f"{k} {v}" for k, v in self.shapes().items() if k != "d_out")
        options = ", ".join(f"{k}={v!r}" for k, v in self.kwargs().items())
        return (
            f"case {self.name!r} on {backend}, {dtype} (seed {self.seed}): {shapes}, "
            f"bias {self.bias_fn or self.bias}, mask {self.mask_fn or self.mask} (rows off: "
            f"{self.masked_rows}), lengths q {self.query_lengths} kv {self.key_lengths}\n"
            f"  uniattn.attention(query, key, value, bias=..., mask=..., {options})\n"
            f"  inputs: from conformance.cases import CASES, make_inputs; "
            f"make_inputs(CASES[{self.name!r}])\n"
            f"  rerun:  pytest conformance --backend={backend} -k '{self.name} and {dtype}'"
        )


def make_inputs(case: Case) -> dict[str, np.ndarray | None]:
    """Float64 (and bool) NumPy inputs of ``case``: query, key, value, bias, mask, d_out."""
    rng = np.random.default_rng(case.seed)
    arrays = {name: rng.standard_normal(shape) for name, shape in case.shapes().items()}
    arrays["query"] = arrays["query"] * case.logit_gain
    arrays["value"] = arrays["value"] * case.value_gain
    if case.integer_qk:
        arrays["query"], arrays["key"] = np.round(arrays["query"]), np.round(arrays["key"])
    arrays["bias"] = None if case.bias is None else rng.standard_normal(case.bias)
    if case.bias_minus_inf:
        arrays["bias"][rng.random(case.bias) < 0.3] = -np.inf
        for row in case.masked_rows:
            arrays["bias"][..., row, :] = -np.inf
    mask = None
    if case.mask is not None:
        mask = rng.random(case.mask) < 0.7
        for row in case.masked_rows:
            mask[..., row, :] = False
    arrays["mask"] = mask
    for name in ("query_lengths", "key_lengths"):
        lengths = getattr(case, name)
        arrays[name] = None if lengths is None else np.reshape(lengths, case.batch).astype(np.int32)
    arrays["sinks"] = None if case.sinks is None else 2.0 * rng.standard_normal(case.sinks)
    q_ids = kv_ids = None
    if case.documents is not None:
        q_ids = segment_ids(case.documents, case.q_len, case.batch)
        kv_ids = q_ids if case.kv_documents is None else None
    if case.kv_documents is not None:
        kv_ids = segment_ids(case.kv_documents, case.kv_len, case.batch)
    if case.shuffled_ids:
        q_ids = rng.permuted(q_ids, axis=-1)
        kv_ids = q_ids if case.kv_documents is None else rng.permuted(kv_ids, axis=-1)
    arrays["q_segment_ids"], arrays["kv_segment_ids"] = q_ids, kv_ids
    return arrays


def segment_ids(documents, length, batch):
    """Ids 0, 0, .., 1, 1, .. of consecutive documents, then -1 (padding), ``[*batch, length]``."""
    ids = np.repeat(np.arange(len(documents)), documents)[:length]
    ids = np.concatenate([ids, np.full(length - ids.size, -1)]).astype(np.int32)
    return np.broadcast_to(ids, (*batch, length)).copy()


def alibi(xp, heads: int, dtype, device=None) -> Callable:
    """ALiBi (Press et al.): ``slope_h * (k - q)`` with slopes ``2^(-8 h / heads)``, exact in
    float32. ``xp`` is the framework's namespace, ``device`` the inputs' (None: its default);
    the result is ``[heads, q_chunk, k_chunk]``."""
    exponents = np.arange(1, heads + 1) * (-8.0 / heads)
    slopes = xp.asarray(np.exp2(exponents), dtype=dtype, device=device)
    slopes = xp.reshape(slopes, (heads, 1, 1))

    def bias(q_idx, k_idx):
        return slopes * xp.astype(k_idx - q_idx, dtype)

    return bias


def documents(xp, heads: int, dtype, device=None) -> Callable:
    """A block-diagonal mask of 16-token documents (packed sequences)."""
    return lambda q_idx, k_idx: (q_idx // 16) == (k_idx // 16)


def near_keys(xp, heads: int, dtype, device=None) -> Callable:
    """A 1-D mask on keys only (``[1, k_chunk]``): every third key is hidden."""
    return lambda q_idx, k_idx: (k_idx % 3) != 1


#: Callable biases and masks by name: ``factory(xp, heads, dtype, device) -> fn(q_idx, k_idx)``.
CALLABLES: dict[str, Callable] = {"alibi": alibi, "documents": documents, "near-keys": near_keys}


_CASES = [
    Case("basic", 64, 64, dtypes=ALL_DTYPES),
    Case("no-batch", 33, 47, batch=(), chunks=(8, 16)),
    Case("two-batch-axes", 20, 30, batch=(2, 3), chunks=(7, 9)),
    Case("three-batch-axes", 9, 13, batch=(2, 1, 2), heads=1, chunks=(4, 5)),
    Case("q-shorter-than-kv", 24, 70, chunks=(8, 16)),
    Case("dv-ne-dk", 50, 80, batch=(1,), d_k=16, d_v=24, chunks=(16, 32)),
    # memory-efficient-attention returns wrong values here (T=100, 50 x 30 chunks).
    Case("non-divisible", 100, 100, batch=(1,), d_k=16, chunks=(50, 30)),
    Case("coprime-chunks", 37, 41, chunks=(5, 7)),
    Case("chunk-1", 9, 11, chunks=(1, 1)),
    Case("chunks-above-lengths", 20, 30, chunks=(1024, 4096)),
    Case("single-key", 12, 1, chunks=(4, 4)),
    Case("single-query", 1, 40, chunks=(4, 16)),
    Case("causal", 64, 64, causal=True, dtypes=ALL_DTYPES),
    Case("causal-q-shorter", 24, 70, causal=True, chunks=(8, 16)),
    # bottom-right: query rows 0..45 see no key at all and must give 0
    Case("causal-q-longer", 70, 24, causal=True, chunks=(16, 8)),
    Case("causal-uneven-chunks", 45, 45, causal=True, chunks=(7, 10)),
    Case("bias-full", 40, 50, heads=4, bias=(2, 4, 40, 50), chunks=(16, 16), dtypes=ALL_DTYPES),
    Case("bias-no-heads", 40, 50, heads=4, bias=(40, 50), chunks=(16, 16)),
    Case("bias-per-head-key", 40, 50, heads=4, bias=(4, 1, 50), chunks=(16, 16)),
    Case("bias-per-batch-query", 40, 50, heads=2, bias=(2, 1, 40, 1), chunks=(16, 16)),
    Case("mask-full", 40, 50, heads=2, mask=(2, 2, 40, 50), masked_rows=(0, 17), dtypes=ALL_DTYPES),
    Case("mask-broadcast", 40, 50, mask=(40, 50), masked_rows=(3, 39)),
    Case("mask-keys-only", 40, 50, mask=(2, 1, 1, 50)),
    Case("mask-all-off", 20, 30, mask=(20, 30), masked_rows=tuple(range(20))),
    Case(
        "mask-and-bias-causal",
        40,
        40,
        heads=2,
        causal=True,
        bias=(2, 40, 40),
        mask=(2, 1, 40, 40),
        masked_rows=(5,),
        chunks=(16, 8),
    ),
    Case("layout-bhtd", 40, 50, layout="BHTD", mask=(40, 50), masked_rows=(1,)),
    Case(
        "layout-bhtd-causal-bias",
        33,
        33,
        layout="BHTD",
        causal=True,
        bias=(2, 2, 33, 33),
        chunks=(8, 8),
    ),
    Case(
        "gqa",
        40,
        56,
        heads=8,
        kv_heads=2,
        causal=True,
        bias=(8, 40, 56),
        chunks=(16, 16),
        dtypes=ALL_DTYPES,
    ),
    Case(
        "gqa-mask-bhtd",
        30,
        30,
        heads=6,
        kv_heads=3,
        layout="BHTD",
        mask=(2, 6, 30, 30),
        masked_rows=(2,),
    ),
    Case("mqa", 30, 45, heads=4, kv_heads=1, chunks=(8, 8)),
    Case("decode", 1, 100, heads=4, kv_heads=2, causal=True, chunks=(1, 32)),
    Case("scale", 30, 30, scale=0.05),
    # -- window, lengths, callables ----------------------------------------------------
    Case("window", 50, 50, window=(7, 3), chunks=(8, 8), dtypes=ALL_DTYPES),
    Case("window-causal-left", 45, 60, causal=True, window=(10, None), chunks=(8, 16)),
    Case("window-right-only", 40, 40, window=(None, 5), chunks=(16, 8)),
    Case("window-q-longer", 60, 20, window=(4, 2), chunks=(16, 8)),
    Case(
        "window-bhtd-mask",
        33,
        41,
        layout="BHTD",
        window=(9, 9),
        mask=(2, 1, 33, 41),
        masked_rows=(4,),
        chunks=(8, 8),
    ),
    # the third sequence has no keys at all: its rows must be 0 with zero gradients
    Case("key-lengths", 40, 50, batch=(3,), key_lengths=(50, 17, 0), chunks=(16, 16)),
    Case("query-lengths", 40, 50, batch=(3,), query_lengths=(40, 5, 0), chunks=(16, 16)),
    # regression (found by tests/test_properties.py): an empty batch with lengths
    Case("empty-batch-lengths", 9, 7, batch=(0,), query_lengths=(), key_lengths=(), chunks=(4, 4)),
    # empty sequences: no rows gives an empty output; no keys gives zeros (lse -inf)
    Case("no-queries", 0, 9, chunks=(4, 4)),
    Case("no-keys", 9, 0, causal=True, chunks=(4, 4)),
    Case(
        "lengths-causal-gqa",
        33,
        33,
        heads=4,
        kv_heads=2,
        causal=True,
        query_lengths=(33, 20),
        key_lengths=(33, 20),
        bias=(2, 4, 33, 33),
        chunks=(8, 8),
        dtypes=ALL_DTYPES,
    ),
    Case(
        "lengths-two-batch-axes",
        20,
        30,
        batch=(2, 3),
        query_lengths=(20, 1, 7, 0, 13, 20),
        key_lengths=(30, 29, 1, 8, 0, 16),
        chunks=(7, 9),
    ),
    Case(
        "alibi", 40, 50, heads=4, causal=True, bias_fn="alibi", chunks=(16, 16), dtypes=ALL_DTYPES
    ),
    Case("documents-mask", 48, 48, mask_fn="documents", bias=(2, 2, 48, 48), chunks=(16, 8)),
    Case(
        "callables-window-lengths",
        37,
        45,
        heads=4,
        kv_heads=2,
        window=(12, 4),
        bias_fn="alibi",
        mask_fn="near-keys",
        key_lengths=(45, 31),
        chunks=(8, 8),
    ),
    # decoding: one query against a cache, grouped heads folded into rows
    Case(
        "decode-gqa-lengths",
        1,
        70,
        heads=8,
        kv_heads=2,
        causal=True,
        key_lengths=(70, 23),
        bias=(2, 8, 1, 70),
        mask=(70,),
        chunks=(2, 16),  # a row chunk below the 4 folded query heads
        dtypes=ALL_DTYPES,
    ),
    Case("decode-window-alibi", 1, 100, heads=6, kv_heads=2, window=(20, 0), bias_fn="alibi"),
    # Found by test_properties.py: a 16-bit custom backward took Δ = rowsum(dO ∘ O) from the
    # rounded output, which a bias broadcast over every row and head sums up.
    Case(
        "decode-bias-scalar",
        1,
        3,
        batch=(2, 2),
        heads=4,
        kv_heads=2,
        d_k=1,
        bias=(1, 1),
        scale=0.0625,
        chunks=(1, 1),
        value_gain=8.0,
        dtypes=("float16", "bfloat16"),  # the bug was 16-bit rounding
    ),
    # Found by test_properties.py: with every key padded no loop trip runs, and
    # backward="autodiff" outputs were not connected to the inputs (torch raised).
    Case(
        "all-keys-padded",
        6,
        9,
        key_lengths=(0, -1),
        bias=(6, 9),
        chunks=(4, 4),
        dtypes=("float32",),  # structural: any dtype shows it
    ),
    Case("empty-batch-bias", 5, 7, batch=(0,), bias=(1, 2, 5, 7), dtypes=("float32",)),
    # -inf in an additive bias is a mask, fully -inf rows included.
    Case(
        "bias-minus-inf",
        20,
        30,
        bias=(2, 1, 20, 30),
        bias_minus_inf=True,
        masked_rows=(3, 17),
        chunks=(8, 16),
    ),
    # A scale of 1e4: logits up to ~2e5, exact (integer q, k). Not float32: the backward's
    # P = exp(S - lse) inherits lse's float32 rounding (spacing 2^-6 at 2e5: up to 0.4% in
    # P, as FlashAttention's); test_adversarial.py checks float32 there for finiteness.
    Case(
        "scale-1e4",
        24,
        40,
        integer_qk=True,
        scale=1e4,
        causal=True,
        chunks=(8, 16),
        dtypes=("float64", "float16"),
    ),
    # -- what models need: packing, sinks, soft-capping, dropout, top-left causal -------
    # (16-bit: packing, sinks and dropout. Top-left causal only moves the causal bound, and
    # softcap acts on float32 scores as every score of a 16-bit input is: the 16-bit cases of
    # causal and of the biases cover their arithmetic.)
    Case("top-left", 24, 40, causal="top_left", chunks=(8, 16)),
    Case("top-left-q-longer", 40, 24, causal="top_left", chunks=(16, 8)),
    Case("top-left-window", 30, 50, causal="top_left", window=(6, None), chunks=(8, 8)),
    Case("bottom-right-named", 24, 40, causal="bottom_right", chunks=(8, 16)),
    Case("packed", 64, 64, documents=(10, 30, 4, 20), chunks=(8, 16), dtypes=ALL_DTYPES),
    Case("packed-causal", 64, 64, documents=(16, 16, 32), causal=True, chunks=(16, 16)),
    # the last 9 positions are padding: their rows give 0 with zero gradients
    Case("packed-padding-gqa", 48, 48, heads=4, kv_heads=2, documents=(20, 19), causal=True),
    Case("packed-uneven-chunks", 45, 45, documents=(7, 11, 13, 14), chunks=(6, 9)),
    Case(
        "packed-cross",
        30,
        50,
        documents=(10, 12, 8),
        kv_documents=(20, 10, 20),
        chunks=(8, 16),
    ),
    Case("packed-shuffled", 40, 40, documents=(10, 10, 10, 10), shuffled_ids=True, chunks=(8, 8)),
    Case(
        "packed-window-bias-bhtd",
        40,
        40,
        layout="BHTD",
        documents=(25, 15),
        window=(5, 5),
        bias=(2, 2, 40, 40),
        chunks=(8, 8),
    ),
    Case("packed-decode", 1, 60, documents=(1,), kv_documents=(30, 30), heads=4, kv_heads=2),
    Case("sinks", 40, 50, heads=4, sinks=(4,), chunks=(16, 16), dtypes=ALL_DTYPES),
    Case("sinks-per-batch", 30, 30, heads=2, sinks=(2, 2), causal=True, chunks=(8, 8)),
    Case("sinks-gqa-window", 40, 40, heads=4, kv_heads=2, sinks=(4,), window=(7, 0)),
    # rows that see no key: 0 output, lse = the sink
    Case("sinks-masked-rows", 20, 30, sinks=(2,), mask=(20, 30), masked_rows=(0, 7)),
    Case("sinks-decode", 1, 40, heads=4, kv_heads=2, sinks=(4,), key_lengths=(40, 11)),
    Case("softcap", 40, 50, softcap=0.5, logit_gain=4.0, chunks=(16, 16)),
    Case("softcap-bias-causal", 33, 33, softcap=2.0, bias=(2, 2, 33, 33), causal=True),
    Case("dropout", 40, 50, dropout_rate=0.3, dropout_seed=11, dtypes=ALL_DTYPES),
    Case("dropout-causal-uneven", 37, 41, causal=True, dropout_rate=0.1, chunks=(5, 7)),
    Case("dropout-gqa-decode", 1, 40, heads=4, kv_heads=2, dropout_rate=0.5, dropout_seed=-3),
    Case(
        "everything",
        45,
        45,
        batch=(2, 2),
        heads=4,
        kv_heads=2,
        causal="top_left",
        window=(20, None),
        documents=(12, 17, 16),
        sinks=(4,),
        softcap=3.0,
        dropout_rate=0.2,
        dropout_seed=2**40 + 5,
        bias=(4, 45, 45),
        key_lengths=(45, 44, 30, 45),
        chunks=(8, 16),
    ),
    Case("huge-logits", 32, 48, logit_gain=1e3, integer_qk=True, scale=0.125, chunks=(8, 8)),
    Case(
        "huge-logits-causal",
        32,
        48,
        logit_gain=1e3,
        integer_qk=True,
        scale=0.125,
        causal=True,
        chunks=(8, 8),
    ),
]
CASES: dict[str, Case] = {c.name: c for c in _CASES}
assert len(CASES) == len(_CASES), "case names must be unique"

#: Half the table that holds every kind of structure it has: batch axes (none to three,
#: empty), grouped heads, head dimensions, every mask feature and its broadcasts, lengths,
#: packing (one id array, a pair, shuffled), sinks, soft-capping, dropout, decoding, chunk
#: sizes (1, uneven, above the lengths), empty shapes, huge logits, both layouts and every
#: dtype (``tests/test_case_table.py`` checks that it does). Backends whose every call
#: compiles run these by default (``PARTIAL`` in ``conftest.py``).
REPRESENTATIVE: tuple[str, ...] = (
    "basic",
    "no-batch",
    "three-batch-axes",
    "non-divisible",
    "dv-ne-dk",
    "single-query",
    "causal-q-longer",
    "top-left",
    "window-q-longer",
    "window-right-only",
    "bias-per-head-key",
    "bias-minus-inf",
    "mask-all-off",
    "mask-and-bias-causal",
    "gqa-mask-bhtd",
    "alibi",
    "documents-mask",
    "callables-window-lengths",
    "key-lengths",
    "lengths-two-batch-axes",
    "empty-batch-lengths",
    "empty-batch-bias",
    "no-queries",
    "no-keys",
    "all-keys-padded",
    "decode-gqa-lengths",
    "decode-window-alibi",
    "decode-bias-scalar",
    "packed",
    "packed-decode",
    "packed-shuffled",
    "sinks-decode",
    "sinks-per-batch",
    "softcap",
    "dropout",
    "huge-logits-causal",
    "everything",
)
#: The representative cases that such backends run in each of their dtypes (the others
#: in float32): every dtype with plain, callable-biased, decoding, fully masked, packed,
#: dropout and all-feature calls.
DTYPE_CASES: tuple[str, ...] = (
    "basic",
    "alibi",
    "decode-gqa-lengths",
    "decode-bias-scalar",
    "all-keys-padded",
    "packed",
    "dropout",
    "everything",
)
