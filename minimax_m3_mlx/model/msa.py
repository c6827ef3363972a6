"""MiniMax Sparse Attention: the index branch's block selection and the block-sparse main branch.

Selection is the reference's, exactly: float32 scores q_idx . k_idx (no scale), future
keys at -inf, max-pooled over blocks of `block_size` key slots anchored at absolute
positions, the query's own block and the `local_blocks - 1` before it forced in with
+inf, top-min(topk, n_blocks) per query and *per index head* (each index head serves
its own group of query heads); a kept block whose score is -inf is no block.

Unlike mlx-lm's port, which widens the selection into a dense [B, heads, L, S] mask and
runs dense attention under it (so nothing is saved, and a 2048-token prefill chunk at
128K context needs ~93 GB), the main branch here gathers only the selected blocks from
the cache and attends over those: per query and group, topk * block_size keys instead
of S. The index branch is scored in key tiles and reduced to block maxima tile by tile,
so no [H_idx, L, S] float32 tensor exists beyond one bounded tile.
"""

from __future__ import annotations

import math
from functools import partial

import mlx.core as mx

# Upper bounds on the transient tensors, in elements / bytes. A 2048-token chunk at
# the real dims then scores 16384 keys per tile (512 MiB of float32 scores) and gathers
# 128 queries' blocks at a time (512 MiB of bf16 K+V); BENCHMARKS.md has the tile sizes
# measured against each other.
INDEX_TILE_ELEMENTS = 1 << 27
GATHER_TILE_BYTES = 1 << 29
# The unsigned word a gather moves cache rows in, by element size in bytes (see _word).
GATHER_WORDS = {2: mx.uint64, 4: mx.uint64}


def index_block_scores(q: mx.array, index_keys: mx.array, offset: int, block_size: int) -> mx.array:
    """Per-block max of the index scores, scored tile by tile over the keys.

    q: [B, H, L, D] index queries for positions offset .. offset+L-1.
    index_keys: [B, 1, C, D] with C >= ceil((offset+L)/block_size)*block_size; slots at or
      past offset+L may hold anything (they are future to every query and masked).
    Scores are float32 products of the stored keys, as the reference's (which upcasts its
    model-dtype keys to score): keys stored in the model dtype are upcast tile by tile,
    quantized ones (kvquant.QuantizedRows) dequantized to float32 tile by tile.
    Returns float32 [B, H, L, n_blocks].
    """
    B, H, L, D = q.shape
    n_blocks = -(-(offset + L) // block_size)
    q = q.astype(mx.float32)
    # Blocks wholly at or before the first query need no causal mask: at decode that is
    # all but the last block, so the mask costs one block, not the whole context.
    unmasked = min(n_blocks, (offset + 1) // block_size)
    tile_blocks = max(1, INDEX_TILE_ELEMENTS // (B * H * L * block_size))
    q_pos = mx.arange(offset, offset + L)[:, None]
    pooled = []
    for lo, hi, masked in ((0, unmasked, False), (unmasked, n_blocks, True)):
        for b0 in range(lo, hi, tile_blocks):
            b1 = min(hi, b0 + tile_blocks)
            k0, k1 = b0 * block_size, b1 * block_size
            s = _scores(q, _index_rows(index_keys, k0, k1))  # [B, H, L, T]
            if masked:
                s = mx.where(mx.arange(k0, k1)[None, :] <= q_pos, s, -mx.inf)
            pooled.append(s.reshape(B, H, L, b1 - b0, block_size).max(axis=-1).astype(mx.float32))
            if L > 1 and n_blocks > tile_blocks:
                mx.eval(pooled[-1])  # bound the live score tiles to one (see sparse_attention)
    return pooled[0] if len(pooled) == 1 else mx.concatenate(pooled, axis=-1)


def _index_rows(index_keys, k0: int, k1: int) -> mx.array:
    """Index-key slots k0..k1 as float32, from a plain buffer or quantized rows."""
    if hasattr(index_keys, "rows"):
        return index_keys.rows(k0, k1, mx.float32)
    return index_keys[:, :, k0:k1, :].astype(mx.float32)


def _scores(q: mx.array, keys: mx.array) -> mx.array:
    """[B, H, L, D] queries x [B, 1, T, D] shared keys -> [B, H, L, T], as one matmul.

    The index heads ride on the row axis ([H*L, D] @ [D, T]) rather than broadcasting the
    keys over a batch axis of H: the same products, without MLX treating the one shared
    key matrix as H batched ones.
    """
    B, H, L, D = q.shape
    return (q.reshape(B, 1, H * L, D) @ keys.swapaxes(-1, -2)).reshape(B, H, L, keys.shape[2])


def select_blocks(block_scores: mx.array, offset: int, block_size: int, topk: int, local_blocks: int):
    """Top-k blocks per (batch, index head, query): indices [B,H,L,k] and their validity."""
    B, H, L, n_blocks = block_scores.shape
    if local_blocks > 0:
        q_block = (mx.arange(offset, offset + L) // block_size)[:, None]
        ids = mx.arange(n_blocks)[None, :]
        # The reference clamps q_block - j at 0, which only repeats block 0: same set.
        local = (ids <= q_block) & (ids > q_block - local_blocks)
        block_scores = mx.where(local, mx.inf, block_scores)
    k = min(topk, n_blocks)
    idx = mx.argpartition(-block_scores, kth=k - 1, axis=-1)[..., :k]
    valid = mx.take_along_axis(block_scores, idx, axis=-1) > -mx.inf
    return idx.astype(mx.int32), valid


def group_maps(n_heads: int, n_kv_heads: int, n_index_heads: int):
    """Selection groups: the finer of the KV and index head partitions of the query heads.

    Each group has one KV head and one index head; for MiniMax-M3 both are 4 and the
    maps are the identity. Returns (n_groups, kv_head_of_group, index_head_of_group).
    """
    g = max(n_kv_heads, n_index_heads)
    kv = [i * n_kv_heads // g for i in range(g)]
    ix = [i * n_index_heads // g for i in range(g)]
    return g, kv, ix


def _word(dtype):
    """The unsigned type a gather moves elements as: MLX's gather is element-wise, so
    moving bf16 cache rows as uint64 words moves 4 values per element, several times
    faster than moving them one by one (BENCHMARKS.md)."""
    return GATHER_WORDS.get(dtype.size)


def gather_blocks(buf: mx.array, block_ids: mx.array, block_size: int) -> mx.array:
    """Rows of whole blocks from a [B, H, C, D] cache buffer (C a multiple of block_size).

    block_ids index the flattened (b, h, block) axis; returns [*block_ids.shape, bs, D].
    The buffer is viewed, not copied: its full capacity is addressed, so no slice of it
    has to be made contiguous first.
    """
    B, H, C, D = buf.shape
    rows = buf.reshape(B * H * (C // block_size), block_size * D)
    word = _word(buf.dtype)
    if word is not None and (block_size * D * buf.dtype.size) % word.size:
        word = None  # a row that is not whole words (a quantized cache's scales) moves as is
    if word is not None:
        rows = rows.view(word)
    out = mx.take(rows, block_ids.reshape(-1), axis=0)
    if word is not None:
        out = out.view(buf.dtype)
    return out.reshape(*block_ids.shape, block_size, D)


def _gather(buf, block_ids: mx.array, block_size: int) -> mx.array:
    """gather_blocks of a plain buffer, or of quantized rows (kvquant.QuantizedRows: the
    selected blocks' words, scales and biases gathered, then dequantized)."""
    if hasattr(buf, "gather_blocks"):
        return buf.gather_blocks(block_ids, block_size)
    return gather_blocks(buf, block_ids, block_size)


def flat_block_ids(blk: mx.array, kv_head_of_group, n_kv_heads: int, blocks_per_row: int) -> mx.array:
    """[B, G, ...] block numbers -> ids into gather_blocks' flattened (b, kv head, block) axis."""
    B, G = blk.shape[:2]
    head = mx.array(kv_head_of_group, dtype=mx.int32).reshape(1, G, *([1] * (blk.ndim - 2)))
    batch = mx.arange(B, dtype=mx.int32).reshape(B, 1, *([1] * (blk.ndim - 2)))
    return (batch * n_kv_heads + head) * blocks_per_row + blk


def sparse_attention(q, keys_buf, values_buf, idx, valid, offset, scale, block_size,
                     index_head_of_group, kv_head_of_group):
    """Attention of each query over its selected blocks only (any L, any selection).

    q: [B, Hq, L, D]; keys_buf/values_buf: the cache's [B, Hkv, C, D] buffers;
    idx/valid: [B, H_idx, L, k]. Returns [B, L, Hq, Dv] (ready for o_proj).
    """
    B, Hq, L, D = q.shape
    Hkv, C = keys_buf.shape[1], keys_buf.shape[2]
    Dv = values_buf.shape[-1]
    bs = block_size
    G = len(index_head_of_group)
    Gq = Hq // G
    k = idx.shape[-1]
    if index_head_of_group != list(range(idx.shape[1])):
        sel = mx.array(index_head_of_group)
        idx, valid = idx[:, sel], valid[:, sel]
    ids_all = flat_block_ids(mx.where(valid, idx, 0), kv_head_of_group, Hkv, C // bs)  # [B, G, L, k]

    per_query = G * k * bs * (D + Dv) * keys_buf.dtype.size
    q_tile = max(1, min(L, GATHER_TILE_BYTES // per_query))
    qg = q.reshape(B, G, Gq, L, D)
    slot = mx.arange(bs, dtype=mx.int32)
    outs = []
    for l0 in range(0, L, q_tile):
        l1 = min(L, l0 + q_tile)
        Lt = l1 - l0
        # (b, query, group, slot) order: the gathered rows are already SDPA's layout
        ids = ids_all[:, :, l0:l1].transpose(0, 2, 1, 3)  # [B, Lt, G, k]
        kg = _gather(keys_buf, ids, bs).reshape(B * Lt, G, k * bs, D)
        vg = _gather(values_buf, ids, bs).reshape(B * Lt, G, k * bs, Dv)
        blk = idx[:, :, l0:l1].transpose(0, 2, 1, 3)  # [B, Lt, G, k]
        key_pos = blk[..., None] * bs + slot  # [B, Lt, G, k, bs]
        if isinstance(offset, mx.array):  # one position per row (a BatchSparseCache)
            q_pos = (offset[:, None] + mx.arange(l0, l1)).reshape(B, Lt, 1, 1, 1)
        else:
            q_pos = mx.arange(offset + l0, offset + l1).reshape(1, Lt, 1, 1, 1)
        keep = (key_pos <= q_pos) & valid[:, :, l0:l1].transpose(0, 2, 1, 3)[..., None]
        keep = keep.reshape(B * Lt, G, 1, k * bs)
        # The group's query heads ride on the query axis: one SDPA "head" per group.
        qt = qg[:, :, :, l0:l1].transpose(0, 3, 1, 2, 4).reshape(B * Lt, G, Gq, D)
        o = mx.fast.scaled_dot_product_attention(qt, kg, vg, scale=scale, mask=keep)
        o = o.reshape(B, Lt, Hq, Dv)
        if q_tile < L:
            # Evaluate tile by tile: left lazy, MLX would gather every tile before the
            # first attention ran (measured: 9 GB at a 2048-token chunk instead of 0.5).
            mx.eval(o)
        outs.append(o)
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1)


def _decode_step(q, idx_q, keys, values, index_keys, pos, *, scale, block_size, topk, local_blocks,
                 kv_quant=None, index_quant=None, rows=None, words_attention=None):
    """Selection and attention of one decode token of an MSA layer, as one graph.

    Every shape depends only on the cache capacity, never on the position (an int32
    array), so the compiled graph is traced once per capacity, not per token (built op by
    op, the step was launch-bound: BENCHMARKS.md). The cache writes stay outside
    (Attention._decode, decode.step): inside a compiled graph MLX does not update the
    buffers in place, and each token would copy the whole cache.

    The own block is gathered whole and its future slots masked; the other topk-1 kept
    blocks are past blocks, whole. Scores run over the whole capacity with future slots
    at -inf (at most one allocation step more than the context).

    A quantized cache passes its (words, scales, biases) triples, with kv_quant /
    index_quant = (group_size, bits) and `rows` to address them (kvquant.decode_step):
    the selected blocks' triples are gathered, then dequantized, or attended by
    `words_attention` (quantized matmuls over the gathered words).
    """
    if rows is not None:
        keys, values, index_keys = rows(keys, kv_quant), rows(values, kv_quant), rows(index_keys, index_quant)
    B, Hq, _, D = q.shape
    Hkv, C = keys.shape[1], keys.shape[2]
    bs = block_size
    nb = C // bs
    s = _scores(idx_q.astype(mx.float32), _index_rows(index_keys, 0, C))  # [B, G, 1, C]
    s = mx.where(mx.arange(C) <= pos, s, -mx.inf)
    s = s.reshape(B, Hkv, nb, bs).max(axis=-1).astype(mx.float32)  # [B, G, nb]
    blocks = mx.arange(nb)
    q_block = pos // bs
    s = mx.where(blocks == q_block, -mx.inf, s)  # taken whole below
    if local_blocks > 1:
        s = mx.where((blocks < q_block) & (blocks > q_block - local_blocks), mx.inf, s)
    idx = mx.argpartition(-s, kth=topk - 2, axis=-1)[..., : topk - 1]
    idx = mx.concatenate([idx, mx.broadcast_to(q_block, (B, Hkv, 1)).astype(idx.dtype)], axis=-1)
    base = (mx.arange(B).reshape(B, 1, 1) * Hkv + mx.arange(Hkv).reshape(1, Hkv, 1)) * nb
    ids = (idx + base).astype(mx.int32)
    # the own block's slots after the query are its future
    mask = mx.arange(topk * bs) <= (topk - 1) * bs + pos - q_block * bs
    if words_attention is not None:
        return words_attention(q, keys, values, ids, mask, scale, topk * bs).transpose(0, 2, 1, 3)
    kg = _gather(keys, ids, bs).reshape(B, Hkv, topk * bs, D)
    vg = _gather(values, ids, bs).reshape(B, Hkv, topk * bs, values.shape[-1])
    o = mx.fast.scaled_dot_product_attention(q, kg, vg, scale=scale, mask=mask.reshape(1, 1, 1, -1))
    return o.transpose(0, 2, 1, 3)


_COMPILED_STEPS = {}


def compiled_decode_step(scale: float, block_size: int, topk: int, local_blocks: int, **quant):
    """One compiled `_decode_step` per distinct layer constants, shared by all layers
    (`quant`: a quantized cache's settings, see kvquant.decode_step)."""
    key = (scale, block_size, topk, local_blocks, tuple(sorted(quant.items())))
    if key not in _COMPILED_STEPS:
        _COMPILED_STEPS[key] = mx.compile(partial(_decode_step, scale=scale, block_size=block_size,
                                                  topk=topk, local_blocks=local_blocks, **quant))
    return _COMPILED_STEPS[key]


def block_mask(idx: mx.array, valid: mx.array, offset: int, n_keys: int, block_size: int,
               n_heads: int) -> mx.array:
    """The dense [B, Hq, L, S] boolean mask equivalent to a selection (the reference's).

    Only for tests and tiny contexts: it is exactly what the sparse path avoids.
    """
    B, H, L, k = idx.shape
    n_blocks = -(-n_keys // block_size)
    blocks = mx.arange(n_blocks)
    kept = ((idx[..., None] == blocks) & valid[..., None]).any(axis=-2)  # [B, H, L, n_blocks]
    kept = mx.repeat(kept, block_size, axis=-1)[..., :n_keys]
    causal = mx.arange(n_keys)[None, :] <= mx.arange(offset, offset + L)[:, None]
    return mx.repeat(kept & causal, n_heads // H, axis=1)


def dense_attention(q, keys, values, scale, mask=None):
    """Dense causal attention over the cache: [B, Hq, L, D] -> [B, L, Hq, D]."""
    L = q.shape[2]
    if mask is None and L > 1:
        mask = "causal"
    o = mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask=mask)
    return o.transpose(0, 2, 1, 3)


def n_blocks_for(n_keys: int, block_size: int) -> int:
    return math.ceil(n_keys / block_size)
