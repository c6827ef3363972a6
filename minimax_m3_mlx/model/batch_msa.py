"""MSA over a BatchSparseCache: each row's selection computed as it would be alone.

Rows sit at different positions (cache.offset, one per row), so the causal mask, the
query's own block and the local blocks are per row; everything else is msa.py's. A
block wholly in a row's future scores -inf and is no block for that row, which is what
lets rows shorter than top-k blocks share a step with longer ones: they keep every past
block, as the dense path does for them alone. One step serves every row at once; no
Python loop runs over the sequences.
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx

from . import kvquant, msa


def _cut(buf, n: int):
    return tuple(p[..., :n, :] for p in buf) if isinstance(buf, tuple) else buf[..., :n, :]


def causal_mask(cache, L: int, n: int) -> mx.array:
    """Each row's causal mask over the first n slots for its L new queries: [B, 1, L, n]."""
    q_pos = cache.offset[:, None] - L + mx.arange(L)  # called after the write
    return (mx.arange(n) <= q_pos[..., None])[:, None]


def attend_full(q: mx.array, k: mx.array, v: mx.array, cache, scale: float) -> mx.array:
    """A full-attention layer over a BatchSparseCache (the quantized batch's): every row
    causal at its own positions. Returns [B, L, Hq, Dv]."""
    L = q.shape[2]
    cache.update_and_fetch(k, v)
    n = max(cache.lengths)
    return kvquant.dense_attention(q, _cut(cache.keys, n), _cut(cache.values, n), scale, cache,
                                   causal_mask(cache, L, n))


def attend(attn, x: mx.array, q: mx.array, k: mx.array, v: mx.array, cache) -> mx.array:
    """Attention.__call__'s sparse branch for a BatchSparseCache. Returns [B, L, Hq, Dv]."""
    B, _, L, _ = q.shape
    offsets = cache.offset
    longest = max(cache.lengths)
    idx_q, idx_k = attn.indexer(x, offsets)
    cache.update_index(idx_k)
    cache.update_and_fetch(k, v)
    bs = attn.block_size
    n_blocks = msa.n_blocks_for(longest + L, bs)
    n_groups, kv_map, ix_map = msa.group_maps(attn.n_heads, attn.n_kv_heads, idx_q.shape[1])
    if n_blocks <= attn.topk:
        # Every row keeps all its blocks: causal attention per row, as alone.
        n = longest + L
        return kvquant.dense_attention(q, _cut(cache.keys, n), _cut(cache.values, n), attn.scale, cache,
                                       causal_mask(cache, L, n))
    if L == 1 and n_groups == attn.n_kv_heads == idx_q.shape[1]:
        step = compiled_decode_step(attn.scale, bs, attn.topk, attn.local_blocks, cache)
        return step(q, idx_q, cache.keys, cache.values, cache.index_keys, offsets)
    q_pos = offsets[:, None] + mx.arange(L)  # [B, L]
    index_keys = kvquant.as_rows(cache.index_keys, cache.index_quant)
    scores = block_scores(idx_q, index_keys, q_pos, n_blocks, bs)
    idx, valid = select_blocks(scores, q_pos, bs, attn.topk, attn.local_blocks)
    keys, values = kvquant.as_rows(cache.keys, cache.kv_quant), kvquant.as_rows(cache.values, cache.kv_quant)
    return msa.sparse_attention(q, keys, values, idx, valid, offsets, attn.scale, bs, ix_map, kv_map)


def block_scores(q: mx.array, index_keys, q_pos: mx.array, n_blocks: int, block_size: int) -> mx.array:
    """msa.index_block_scores with a position per row: q_pos [B, L]. float32 [B, H, L, n_blocks],
    from float32 products as alone (keys upcast or dequantized tile by tile)."""
    B, H, L, D = q.shape
    q = q.astype(mx.float32)
    tile = max(1, msa.INDEX_TILE_ELEMENTS // (B * H * L * block_size))
    pos = q_pos[:, None, :, None]
    pooled = []
    for b0 in range(0, n_blocks, tile):
        b1 = min(n_blocks, b0 + tile)
        k0, k1 = b0 * block_size, b1 * block_size
        s = msa._scores(q, msa._index_rows(index_keys, k0, k1))
        s = mx.where(mx.arange(k0, k1) <= pos, s, -mx.inf)
        pooled.append(s.reshape(B, H, L, b1 - b0, block_size).max(axis=-1).astype(mx.float32))
        if L > 1 and n_blocks > tile:
            mx.eval(pooled[-1])
    return pooled[0] if len(pooled) == 1 else mx.concatenate(pooled, axis=-1)


def select_blocks(scores: mx.array, q_pos: mx.array, block_size: int, topk: int, local_blocks: int):
    """msa.select_blocks with a position per row."""
    n_blocks = scores.shape[-1]
    if local_blocks > 0:
        q_block = (q_pos // block_size)[:, None, :, None]
        ids = mx.arange(n_blocks)
        scores = mx.where((ids <= q_block) & (ids > q_block - local_blocks), mx.inf, scores)
    k = min(topk, n_blocks)
    idx = mx.argpartition(-scores, kth=k - 1, axis=-1)[..., :k]
    valid = mx.take_along_axis(scores, idx, axis=-1) > -mx.inf
    return idx.astype(mx.int32), valid


def _decode_step(q, idx_q, keys, values, index_keys, pos, *, scale, block_size, topk, local_blocks,
                 kv_quant=None, index_quant=None):
    """msa._decode_step for rows at positions pos [B]: one graph, whatever the positions.

    The own block is taken whole with its future slots masked, the others by score; a
    block a short row has not reached scores -inf and is masked out (such a row keeps
    every past block, as alone). Each group's query heads ride on the query axis, so the
    mask can differ per (row, group).
    """
    keys, values = kvquant.as_rows(keys, kv_quant), kvquant.as_rows(values, kv_quant)
    index_keys = kvquant.as_rows(index_keys, index_quant)
    B, Hq, _, D = q.shape
    Hkv, C = keys.shape[1], keys.shape[2]
    Dv = values.shape[-1]
    bs = block_size
    nb = C // bs
    k = min(topk, nb)
    p = pos.reshape(B, 1, 1)
    s = msa._scores(idx_q.astype(mx.float32), msa._index_rows(index_keys, 0, C))[:, :, 0]  # [B, G, C]
    s = mx.where(mx.arange(C) <= p, s, -mx.inf)
    s = s.reshape(B, Hkv, nb, bs).max(axis=-1).astype(mx.float32)  # [B, G, nb]
    blocks = mx.arange(nb)
    q_block = p // bs
    s = mx.where(blocks == q_block, -mx.inf, s)
    if local_blocks > 1:
        s = mx.where((blocks < q_block) & (blocks > q_block - local_blocks), mx.inf, s)
    own = mx.broadcast_to(q_block, (B, Hkv, 1)).astype(mx.int32)
    if k > 1:
        idx = mx.argpartition(-s, kth=k - 2, axis=-1)[..., : k - 1].astype(mx.int32)
        valid = mx.take_along_axis(s, idx, axis=-1) > -mx.inf
        idx = mx.concatenate([idx, own], axis=-1)
        valid = mx.concatenate([valid, mx.ones((B, Hkv, 1), dtype=mx.bool_)], axis=-1)
    else:
        idx, valid = own, mx.ones((B, Hkv, 1), dtype=mx.bool_)
    base = (mx.arange(B).reshape(B, 1, 1) * Hkv + mx.arange(Hkv).reshape(1, Hkv, 1)) * nb
    ids = idx + base.astype(mx.int32)
    key_pos = idx[..., None] * bs + mx.arange(bs)  # [B, G, k, bs]
    keep = ((key_pos <= pos.reshape(B, 1, 1, 1)) & valid[..., None]).reshape(B, Hkv, 1, k * bs)
    if kv_quant is not None and kvquant.SPARSE_ATTENTION == "matmul":
        kw = tuple(p.reshape(B, Hkv, k * bs, -1) for p in keys.gather_words(ids, bs))
        vw = tuple(p.reshape(B, Hkv, k * bs, -1) for p in values.gather_words(ids, bs))
        return kvquant.matmul_attention(q, kw, vw, keep, scale, *kv_quant).reshape(B, 1, Hq, Dv)
    kg = msa._gather(keys, ids, bs).reshape(B, Hkv, k * bs, D)
    vg = msa._gather(values, ids, bs).reshape(B, Hkv, k * bs, Dv)
    qg = q.reshape(B, Hkv, Hq // Hkv, D)
    o = mx.fast.scaled_dot_product_attention(qg, kg, vg, scale=scale, mask=keep)
    return o.reshape(B, 1, Hq, Dv)


_COMPILED = {}


def compiled_decode_step(scale: float, block_size: int, topk: int, local_blocks: int, cache):
    """One compiled `_decode_step` per layer constants and cache quantization, shared by all layers."""
    key = (scale, block_size, topk, local_blocks, cache.kv_quant, cache.index_quant, kvquant.SPARSE_ATTENTION)
    if key not in _COMPILED:
        _COMPILED[key] = mx.compile(partial(_decode_step, scale=scale, block_size=block_size, topk=topk,
                                            local_blocks=local_blocks, kv_quant=cache.kv_quant,
                                            index_quant=cache.index_quant))
    return _COMPILED[key]
