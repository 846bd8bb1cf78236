"""uniattn as an attention implementation of Hugging Face transformers (4.53 and later).

>>> import uniattn.integrations.transformers as uniattn_hf
>>> uniattn_hf.register()  # doctest: +SKIP
>>> model = AutoModelForCausalLM.from_config(config, attn_implementation="uniattn")  # doctest: +SKIP

:func:`register` puts two functions under one name: :func:`attention_forward` in
transformers' ``AttentionInterface`` and :func:`create_mask` in its ``AttentionMaskInterface``.
The mask function returns a :class:`StructuredMask` instead of a ``[batch, 1, q_len, kv_len]``
array: causal attention, sliding windows and packed documents reach ``uniattn.attention`` as
its ``causal``, ``window`` and ``segment_ids``, and padding as segment ids, so no
``q_len x kv_len`` array exists and the chunks a structure masks entirely are skipped. A
pattern it does not recognise (chunked attention, a static cache's empty slots after the
queries) becomes a callable ``mask`` that evaluates transformers' mask function one chunk
at a time. Only a pattern that transformers itself evaluates with ``torch.vmap`` (a
model's own ``or_mask_function`` or ``and_mask_function``, as multimodal models add) is
materialised, as transformers' ``sdpa`` mask, and passed as a dense ``mask``.

uniattn never forms the attention weights: ``output_attentions=True`` and a ``head_mask``
raise a ValueError. The check reads the ``output_attentions`` keyword the attention
function receives (transformers 5 passes a forward's own down), else the model's config;
where a model passes neither down, its attentions come back as None, as with ``sdpa``.

Importing this module imports neither torch nor transformers; :func:`register` does.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import uniattn

#: The oldest transformers with the ``AttentionMaskInterface`` registry.
MIN_VERSION = (4, 53)

__all__ = ["MIN_VERSION", "StructuredMask", "attention_forward", "create_mask", "register"]


def register(name: str = "uniattn") -> str:
    """Register uniattn with transformers under ``name``.

    Afterwards ``AutoModel*.from_config(config, attn_implementation=name)``,
    ``from_pretrained(..., attn_implementation=name)`` and
    ``model.set_attn_implementation(name)`` run every attention layer of models written
    against transformers' ``AttentionInterface`` through :func:`uniattn.attention`.

    Parameters
    ----------
    name : str
        The ``attn_implementation`` name. Registering an existing name such as ``"sdpa"``
        replaces transformers' function for every model; ``"eager"`` is refused, as
        transformers treats it as the built-in fallback.

    Returns
    -------
    str
        ``name``.

    Raises
    ------
    ImportError
        transformers is missing or older than 4.53.
    TypeError, ValueError
        ``name`` is not a non-empty string, or is ``"eager"``.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str; got {type(name).__name__}")
    if not name or name == "eager" or name.startswith("paged|"):
        raise ValueError(
            f"name must be a non-empty string other than 'eager' and without the 'paged|' "
            f"prefix, which transformers reserves; got {name!r}"
        )
    transformers = _transformers()
    from transformers.masking_utils import AttentionMaskInterface

    transformers.AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, create_mask)
    return name


def _transformers():
    try:
        import transformers
    except ImportError as error:
        raise ImportError(
            "uniattn.integrations.transformers needs transformers: "
            "pip install 'uniattn[transformers]'"
        ) from error
    found = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())
    if found < MIN_VERSION:
        raise ImportError(
            f"uniattn.integrations.transformers needs transformers >= 4.53 (its "
            f"AttentionMaskInterface); found {transformers.__version__}"
        )
    return transformers


@dataclass(frozen=True)
class _Pattern:
    """A mask function that :func:`create_mask` recognised, in uniattn's terms."""

    causal: bool
    #: Keys attended before a query's own position (transformers' sliding window - 1).
    left: int | None = None
    #: Packed documents: int ``[batch, length]``, the same for queries and keys.
    segments: Any = None


class StructuredMask:
    """What :func:`create_mask` hands the attention layers in place of a dense mask.

    transformers passes it through its models untouched (it is a ``BlockMask`` to
    transformers' checks, where torch has flex attention, so that a mask built ahead, as
    ``generate`` does for a static cache, is also passed through);
    :func:`attention_forward` turns it into :func:`uniattn.attention` keywords for the
    key and value lengths of each call.

    Attributes
    ----------
    batch, q_length, kv_length : int
        The batch size and the query and key lengths the mask was made for; ``shape`` is
        ``(batch, 1, q_length, kv_length)``, the shape of the mask it stands for.
    q_offset, kv_offset : int
        Absolute position of the first query and the first key (a KV cache puts earlier
        keys before the queries; a sliding-window cache drops the oldest).
    function : callable or None
        transformers' mask function ``f(batch_idx, head_idx, q_idx, kv_idx) -> bool`` of
        absolute positions, padding excluded; evaluated chunk by chunk where ``pattern``
        is None or cannot be aligned with the keys of a call.
    pattern : _Pattern or None
        The structure recognised in ``function``: causal or not, a sliding window, packed
        documents.
    padding : bool tensor ``[batch, >= kv_offset + kv_length]`` or None
        transformers' 2-D attention mask (False: a padding key); becomes segment ids.
    q_positions : int tensor ``[q_length]`` or None
        Absolute query positions, where they are not ``q_offset + arange(q_length)``.
    dense : bool tensor ``[batch, 1, q_length, kv_length]`` or None
        The materialised mask, for mask functions transformers evaluates with
        ``torch.vmap`` only; everything else is None then.
    """

    _TENSORS = ("padding", "q_positions", "dense")

    def __init__(
        self,
        batch: int,
        q_length: int,
        kv_length: int,
        q_offset: int = 0,
        kv_offset: int = 0,
        *,
        function: Any = None,
        pattern: _Pattern | None = None,
        padding: Any = None,
        q_positions: Any = None,
        dense: Any = None,
    ):
        self.batch, self.q_length, self.kv_length = batch, q_length, kv_length
        self.q_offset, self.kv_offset = q_offset, kv_offset
        self.function, self.pattern = function, pattern
        self.padding, self.q_positions, self.dense = padding, q_positions, dense

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch, 1, self.q_length, self.kv_length)

    def __repr__(self) -> str:
        p = self.pattern
        what = (
            "dense"
            if self.dense is not None
            else "per-chunk callable"
            if p is None
            else ("causal" if p.causal else "bidirectional")
            + ("" if p.left is None else f", window {p.left + 1}")
            + ("" if p.segments is None else ", packed")
        )
        padded = "" if self.padding is None else ", padded"
        return (
            f"StructuredMask({what}{padded}, shape {self.shape}, offsets "
            f"({self.q_offset}, {self.kv_offset}))"
        )

    __str__ = __repr__  # not BlockMask's, which reads its block tensors

    def to(self, *args: Any, **kwargs: Any) -> StructuredMask:
        """A copy with its tensors moved by ``Tensor.to(*args, **kwargs)`` (a device)."""
        moved = {n: getattr(self, n) for n in self._TENSORS}
        moved = {n: None if t is None else t.to(*args, **kwargs) for n, t in moved.items()}
        copy = object.__new__(type(self))
        copy.__dict__.update({**self.__dict__, **moved})
        return copy

    def keywords(self, batch: int, q_len: int, kv_len: int, device: Any) -> dict[str, Any]:
        """:func:`uniattn.attention` keywords for queries ``[batch, heads, q_len, d]`` and
        keys ``[batch, kv_heads, kv_len, d]`` (on ``device``) that this mask describes.

        The keys are taken to be at positions ``kv_offset + arange(kv_len)``, as
        transformers' eager attention takes the first ``kv_len`` columns of its mask.
        """
        import torch

        if self.dense is not None:
            return {"mask": self.dense[..., :kv_len]}
        if q_len != self.q_length:
            raise ValueError(
                f"attention_mask was made for {self.q_length} queries; the query has {q_len}"
            )
        keywords: dict[str, Any] = {}
        p = self.pattern
        # Positions are aligned when the last query and the last key are the same token:
        # then uniattn's bottom-right causal diagonal is transformers' kv_pos <= q_pos.
        aligned = self.q_positions is None and self.q_offset + q_len == self.kv_offset + kv_len
        if p is not None and (aligned or (not p.causal and p.left is None)):
            if p.causal:
                keywords["causal"] = True
            if p.left is not None:
                keywords["window"] = (p.left, None)
            segments = p.segments
        else:
            keywords["mask"] = self._callable(batch, device)
            segments = None
        kv_ids = q_ids = None
        if segments is not None:
            q_ids = segments[:, self.q_offset : self.q_offset + q_len]
            kv_ids = segments[:, self.kv_offset : self.kv_offset + kv_len]
        if self.padding is not None:
            padding = self.padding[:, self.kv_offset : self.kv_offset + kv_len]
            if padding.shape[1] < kv_len:  # transformers pads its 2-D mask with False
                padding = torch.nn.functional.pad(padding, (0, kv_len - padding.shape[1]))
            kv_ids = torch.where(padding, 0 if kv_ids is None else kv_ids, -1)
            if q_ids is None:  # transformers masks padding keys, never padding queries
                q_ids = torch.zeros((batch, q_len), dtype=torch.int32, device=device)
        if kv_ids is not None:
            keywords["segment_ids"] = (
                q_ids.to(device=device, dtype=torch.int32),
                kv_ids.to(device=device, dtype=torch.int32),
            )
        return keywords

    def _callable(self, batch: int, device: Any):
        """transformers' mask function as a :func:`uniattn.attention` callable ``mask``."""
        import torch

        function, q_offset, kv_offset = self.function, self.q_offset, self.kv_offset
        positions = self.q_positions
        batch_idx = torch.arange(batch, device=device).view(-1, 1, 1, 1)
        head_idx = torch.zeros(1, dtype=torch.long, device=device).view(1, -1, 1, 1)

        def mask(q_idx, k_idx):
            q_idx, k_idx = q_idx.long(), k_idx.long()
            q_pos = q_idx + q_offset if positions is None else positions[q_idx]
            return function(batch_idx, head_idx, q_pos[None, None], (k_idx + kv_offset)[None, None])

        return mask


def create_mask(
    batch_size: int,
    kv_length: int,
    kv_offset: Any = 0,
    mask_function: Any = None,
    attention_mask: Any = None,
    *,
    q_length: int | None = None,
    q_offset: Any = 0,
    cache_position: Any = None,
    use_vmap: bool = False,
    **kwargs: Any,
) -> StructuredMask:
    """transformers' mask interface for uniattn (registered by :func:`register`).

    transformers calls it where a model builds its causal, sliding-window or bidirectional
    mask, with the mask function that describes the pattern, the 2-D padding mask and the
    query and key positions (``q_length``/``q_offset`` from 5.0, ``cache_position`` before).

    Returns
    -------
    StructuredMask
    """
    import torch
    from transformers import masking_utils

    received = dict(
        batch_size=batch_size,
        kv_length=kv_length,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        use_vmap=use_vmap,
        **kwargs,
    )
    if cache_position is not None:
        received["cache_position"] = cache_position
    if q_length is not None:
        received.update(q_length=q_length, q_offset=q_offset)
    if cache_position is not None and q_length is None:  # transformers 4.x
        q_length = int(cache_position.shape[0])
        q_offset = int(cache_position[0]) if q_length else 0
        step = cache_position[1:] - cache_position[:-1]
        contiguous = bool((step == 1).all()) if q_length > 1 else True
        q_positions = None if contiguous else cache_position
    else:
        q_positions = None
    q_offset, kv_offset = int(q_offset), int(kv_offset)
    if mask_function is None:
        mask_function = masking_utils.causal_mask_function
    pattern = _recognise(mask_function, masking_utils)
    if pattern is None and use_vmap:
        # A mask function transformers only runs under torch.vmap may index with scalars:
        # build the mask the way transformers' sdpa does.
        received.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
        dense = masking_utils.sdpa_mask(**received)
        return _mask_class(masking_utils)(
            batch_size, q_length, kv_length, q_offset, kv_offset, dense=dense
        )
    padding = None
    if attention_mask is not None:
        padding = attention_mask.to(torch.bool)
        window = padding[:, kv_offset : kv_offset + kv_length]
        if window.shape[1] == kv_length and bool(window.all()):
            padding = None
    return _mask_class(masking_utils)(
        batch_size,
        q_length,
        kv_length,
        q_offset,
        kv_offset,
        function=mask_function,
        pattern=pattern,
        padding=padding,
        q_positions=q_positions,
    )


_MASK_CLASSES: dict[type, type] = {}


def _mask_class(masking_utils) -> type:
    """:class:`StructuredMask`, made a subclass of torch's ``BlockMask`` where
    transformers has it: transformers passes a ready mask through unchanged only if it is a
    ``torch.Tensor`` or a ``BlockMask`` (of four dimensions, by its ``shape``)."""
    import torch

    block_mask = getattr(masking_utils, "BlockMask", torch.Tensor)
    if block_mask is torch.Tensor or not isinstance(block_mask, type):
        return StructuredMask  # torch without flex attention: transformers checks tensors only
    if block_mask not in _MASK_CLASSES:
        # StructuredMask first: its __init__, shape, to and __repr__ replace BlockMask's.
        _MASK_CLASSES[block_mask] = type(
            "StructuredMask", (StructuredMask, block_mask), {"__module__": __name__}
        )
    return _MASK_CLASSES[block_mask]


def _closure(function) -> dict[str, Any]:
    try:
        return inspect.getclosurevars(function).nonlocals
    except (TypeError, ValueError):
        return {}


def _recognise(function, masking_utils) -> _Pattern | None:
    """The :class:`_Pattern` of a mask function composed of transformers' own pieces
    (causal, bidirectional, sliding window, packed documents), or None."""
    parts = _parts(function, masking_utils)
    if parts is None:
        return None
    bases = [p for p in parts if p[0] in ("causal", "bidirectional")]
    if not bases:
        return None
    causal = any(p[0] == "causal" for p in bases)
    lefts = [p[1] for p in parts if p[0] == "left"]
    segments = [p[1] for p in parts if p[0] == "segments"]
    remapped = any(p[0] == "remapped" for p in parts)
    if len(segments) > 1 or (remapped and not segments):
        return None
    return _Pattern(causal, min(lefts) if lefts else None, segments[0] if segments else None)


def _parts(function, masking_utils) -> list[tuple] | None:
    """The conjunction of known pieces that ``function`` is, or None."""
    if function is getattr(masking_utils, "causal_mask_function", None):
        return [("causal",)]
    if function is getattr(masking_utils, "bidirectional_mask_function", None):
        return [("bidirectional",)]
    name = getattr(function, "__qualname__", "")
    free = _closure(function)
    if name.endswith("and_masks.<locals>.and_mask") and "mask_functions" in free:
        parts = []
        for inner in free["mask_functions"]:
            found = _parts(inner, masking_utils)
            if found is None:
                return None
            parts += found
        return parts
    if name.endswith("sliding_window_overlay.<locals>.inner_mask"):
        left = _left_extent(function)
        return None if left is None else [("left", left)]
    if name.endswith("packed_sequence_mask_function.<locals>.inner_mask"):
        segments = free.get("packed_sequence_mask")
        return None if segments is None else [("segments", segments)]
    if name.endswith("remap_positions_for_packed_sequence.<locals>.inner_mask"):
        # Inside one packed document positions step by one, so a pattern of differences of
        # positions (causal, window) is the same in remapped and in packed positions.
        inner = _parts(free.get("mask_function"), masking_utils)
        return None if inner is None else [*inner, ("remapped",)]
    return None


def _left_extent(overlay) -> int | None:
    """How many keys before its own position a sliding-window overlay lets a query see,
    read off the overlay on one row (so that another convention is never misread), or
    None if the row is not a lower bound on the key position."""
    import torch

    window = _closure(overlay).get("sliding_window")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        return None
    q = 2 * window + 2
    kv = torch.arange(3 * window + 4)
    zero = torch.zeros((), dtype=torch.long)
    try:
        seen = overlay(zero, zero, torch.tensor(q), kv)
    except Exception:  # not an index function: leave it to the callable path
        return None
    if not (isinstance(seen, torch.Tensor) and seen.dtype == torch.bool) or not bool(seen.any()):
        return None
    first = int(kv[seen].min())
    if seen.shape != kv.shape or first == 0 or not bool((seen == (kv >= first)).all()):
        return None
    return q - first


def attention_forward(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    *,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: Any = None,
    is_causal: bool | None = None,
    position_bias: Any = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """transformers' attention interface for uniattn (registered by :func:`register`).

    Parameters
    ----------
    module : torch.nn.Module
        The attention layer (its ``training`` flag gates dropout; ``is_causal`` is read
        when no mask is given).
    query : tensor ``[batch, heads, q_len, d]``
    key, value : tensors ``[batch, kv_heads, kv_len, d]``
        As the layer has them, KV cache included; never repeated to ``heads``.
    attention_mask : StructuredMask, tensor or None
        A :class:`StructuredMask`; a 4-D tensor broadcastable to ``[batch, heads, q_len,
        kv_len]``, bool (True: attend) or additive float; or None: causal per ``is_causal``
        (default the module's, else True), with ``sliding_window``.
    scaling : float, optional
        Score scale (default ``1 / sqrt(d)``).
    dropout : float
        Attention dropout rate, applied while ``module.training``; its seed is drawn
        from torch's generator on the query's device, so ``torch.manual_seed`` makes it
        reproducible and activation checkpointing recomputes the same mask.
    sliding_window : int, optional
        Keys a query sees, its own included; used when ``attention_mask`` is None (a
        mask carries its own window).
    softcap : float, optional
        Gemma 2's ``attn_logit_softcapping``.
    s_aux : tensor ``[heads]``, optional
        Attention sinks (gpt-oss).
    is_causal : bool, optional
    position_bias : tensor, optional
        Additive bias broadcastable to ``[batch, heads, q_len, kv_len]``.

    Returns
    -------
    (tensor ``[batch, q_len, heads, d]``, None)
        No attention weights: uniattn never forms them.

    Raises
    ------
    ValueError
        ``output_attentions=True`` (in the call or the model's config) or a ``head_mask``:
        both need the attention weights. Use ``attn_implementation="eager"`` for them.
    """
    import torch

    _check_supported(module, kwargs)
    batch, q_len, kv_len = query.shape[0], query.shape[2], key.shape[2]
    keywords: dict[str, Any] = {"layout": "BHTD", "scale": scaling, "softcap": softcap}
    if s_aux is not None:
        keywords["sinks"] = s_aux
    bias = position_bias
    if isinstance(attention_mask, StructuredMask):
        keywords.update(attention_mask.keywords(batch, q_len, kv_len, query.device))
    elif attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        keywords["causal"] = bool(causal)
        if sliding_window is not None:
            left = int(sliding_window) - 1
            keywords["window"] = (left, 0 if causal else left)
    elif isinstance(attention_mask, torch.Tensor):
        if attention_mask.ndim != 4:
            raise ValueError(
                "attention_mask must be a 4-D tensor broadcastable to [batch, heads, q_len, "
                f"kv_len] (or transformers' 2-D mask, given to the model); got shape "
                f"{tuple(attention_mask.shape)}"
            )
        mask = attention_mask[..., :kv_len]
        if mask.dtype == torch.bool:
            keywords["mask"] = mask
        else:
            mask = mask.to(query.dtype)
            bias = mask if bias is None else bias + mask
    else:
        raise TypeError(
            "attention_mask must be a uniattn StructuredMask, a torch.Tensor or None; got "
            f"{type(attention_mask).__name__} (was the model's mask built for another "
            "attn_implementation?)"
        )
    if bias is not None:
        keywords["bias"] = bias.to(query.dtype)
    if dropout and getattr(module, "training", True):
        keywords["dropout_rate"] = float(dropout)
        keywords["dropout_seed"] = torch.randint(
            0, 2**32, (), dtype=torch.int64, device=query.device
        )
    out = uniattn.attention(query, key, value, **keywords)
    return out.transpose(1, 2), None


def _check_supported(module, kwargs) -> None:
    output_attentions = kwargs.get("output_attentions")
    if output_attentions is None:
        config = getattr(module, "config", None)
        output_attentions = getattr(config, "output_attentions", False)
    if output_attentions:
        raise ValueError(
            "output_attentions=True asks for the attention weights, which uniattn never "
            "forms (it holds one chunk of scores at a time); run that call with "
            "attn_implementation='eager'"
        )
    if kwargs.get("head_mask") is not None:
        raise ValueError(
            "head_mask is not supported by uniattn's attention (it scales the attention "
            "weights, which uniattn never forms); use attn_implementation='eager'"
        )
