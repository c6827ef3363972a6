"""decode.py's compiled layer step for a batch of rows (mlx-lm's BatchGenerator).

The same pieces as decode.step (compiled pre and post, cache writes outside any graph),
with the attention of batch caches: mlx-lm's BatchKVCache (left padding, its mask) on
full-attention layers, BatchSparseCache's per-row selection (batch_msa) on MSA layers.
The position is one int32 per row; every shape depends on the batch size and the cache
capacity only, so each is traced once per batch width, not per token.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache

from . import batch_msa, decode, msa
from .batch_cache import BatchSparseCache


def usable(layer, x: mx.array, cache) -> bool:
    """Whether the compiled step computes what layer(x, cache) would, op by op."""
    if x.shape[1] != 1 or layer.sharding_group is not None or getattr(cache, "keys", None) is None:
        return False
    attn = layer.self_attn
    if not attn.is_sparse:
        return type(cache) in (BatchKVCache, BatchSparseCache)
    if not isinstance(cache, BatchSparseCache) or cache.index_keys is None:
        return False
    n_idx = attn.indexer.n_heads
    return (msa.n_blocks_for(max(cache.lengths) + 1, attn.block_size) > attn.topk and attn.local_blocks >= 1
            and n_idx == attn.n_kv_heads and msa.group_maps(attn.n_heads, attn.n_kv_heads, n_idx)[0] == n_idx)


def step(layer, x: mx.array, cache) -> mx.array:
    pre, post = decode.pieces(layer)
    attn = layer.self_attn
    pos = cache.offset
    if attn.is_sparse:
        q, k, v, idx_q, idx_k = pre(x, pos)
        cache.update_index(idx_k)
        cache.update_and_fetch(k, v)
        attend = batch_msa.compiled_decode_step(attn.scale, attn.block_size, attn.topk, attn.local_blocks, cache)
        o = attend(q, idx_q, cache.keys, cache.values, cache.index_keys, pos)
    elif isinstance(cache, BatchSparseCache):  # the quantized batch's full-attention layers
        q, k, v = pre(x, pos)
        o = batch_msa.attend_full(q, k, v, cache, attn.scale)
    else:
        q, k, v = pre(x, pos)
        # Before the write: it hides each row's left padding. A lone row has none (merge,
        # filter and finalize leave the shortest row unpadded), and unmasked it attends as
        # on the single path: MLX CUDA's masked GQA attention is several times slower
        # (BENCHMARKS.md, batched decode), which a lone request in the server would pay.
        mask = cache.make_mask(1) if x.shape[0] > 1 else None
        keys, values = cache.update_and_fetch(k, v)
        o = msa.dense_attention(q, keys, values, attn.scale, mask)
    return post(x, o)
