"""A model's caches as per-token arrays, and back: what the prompt-cache disk tier stores.

Every cache kind a MiniMax-M3 model makes keeps its tokens on axis 2 of [B, H, S, D]
buffers: mlx-lm's KVCache (full-attention layers), SparseKVCache (K, V, index keys) and
QuantizedSparseKVCache (each of K, V and the index keys as words, scales and biases, or the
index keys plain at 16/32 bits). `token_buffers` hands out those buffers whole (no copy:
the disk tier reads a block's rows straight out of them) and `restore` builds a cache of
the same kind from rows read back. Quantization is per group along D, so any slice of
tokens is exactly what those tokens' quantization gave: blocks of a quantized cache are
exact too.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from .cache import SparseKVCache
from .kvquant import QuantizedSparseKVCache


def _flat(t) -> List[mx.array]:
    if t is None:
        return []
    return list(t) if isinstance(t, (list, tuple)) else [t]


def kind(cache) -> Optional[str]:
    """A name for the layout `token_buffers` gives of this cache (None: a kind not stored,
    such as mlx-lm's QuantizedKVCache after --quantized-kv-start)."""
    if type(cache) is QuantizedSparseKVCache:
        idx = cache.index_keys
        shape = "none" if idx is None else "words" if isinstance(idx, (list, tuple)) else "plain"
        return f"qsparse/{cache.bits}/{cache.group_size}/{cache.index_bits}/{shape}"
    if type(cache) is SparseKVCache:
        return "sparse/index" if cache.index_keys is not None else "sparse"
    if type(cache) is KVCache:
        return "kv"
    return None


def token_buffers(cache) -> Tuple[List[mx.array], int]:
    """(the cache's whole buffers, tokens on axis 2 beyond `offset` unwritten; offset)."""
    if cache.keys is None:
        return [], 0
    if type(cache) is QuantizedSparseKVCache:
        return [*cache.keys, *cache.values, *_flat(cache.index_keys)], cache.offset
    if type(cache) is SparseKVCache:
        return [cache.keys, cache.values, *_flat(cache.index_keys)], cache.offset
    if type(cache) is KVCache:
        return [cache.keys, cache.values], cache.offset
    raise TypeError(f"{type(cache).__name__}: not a cache kind the prompt-cache store keeps")


def restore(template, parts: Sequence[mx.array], n: int):
    """`template` (an empty cache of the wanted kind, as Model.make_cache makes it) holding
    `n` tokens from `parts`, laid out as `token_buffers` gives them (axis 2 >= n)."""
    if type(template) is QuantizedSparseKVCache:
        k, v, idx = tuple(parts[0:3]), tuple(parts[3:6]), list(parts[6:])
        index = tuple(idx) if len(idx) == 3 else idx[0] if idx else None
        template.state = (k, v, index, n, template.block_size, template.group_size, template.bits,
                          template.index_bits)
    elif type(template) is SparseKVCache:
        index = parts[2] if len(parts) > 2 else None
        template.state = (parts[0], parts[1], index, n, template.block_size, template.index_dtype or "")
    elif type(template) is KVCache:
        template.state = (parts[0], parts[1], n)  # mlx-lm 0.32's state: whole buffers and the offset
    else:
        raise TypeError(f"{type(template).__name__}: not a cache kind the prompt-cache store keeps")
    return template
