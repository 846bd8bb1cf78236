"""uniattn: memory-efficient attention written once, for NumPy, JAX, PyTorch and TensorFlow.

>>> import uniattn
>>> out = uniattn.attention(q, k, v, causal=True)  # doctest: +SKIP

Importing uniattn imports no framework; the backend is picked from the arrays' types.
"""

from ._api import attention, vjp
from ._ring import merge, ring_attention, unzigzag, zigzag
from ._segments import segment_ids_from_cu_seqlens

__version__ = "0.1.0"
__all__ = [
    "attention",
    "merge",
    "ring_attention",
    "segment_ids_from_cu_seqlens",
    "unzigzag",
    "vjp",
    "zigzag",
]
