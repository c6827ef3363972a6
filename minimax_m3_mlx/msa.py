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

import mlx.core as mx

# Upper bounds on the transient tensors, in elements / bytes. A 2048-token chunk at
# the real dims then scores 8192 keys per tile (256 MiB of float32 scores) and gathers
# 64 queries' blocks at a time (256 MiB of bf16 K+V).
INDEX_TILE_ELEMENTS = 1 << 26
GATHER_TILE_BYTES = 1 << 28


def index_block_scores(q: mx.array, index_keys: mx.array, offset: int, block_size: int) -> mx.array:
    """Per-block max of the index scores, scored tile by tile over the keys.

    q: [B, H, L, D] index queries for positions offset .. offset+L-1.
    index_keys: [B, 1, C, D] with C >= ceil((offset+L)/block_size)*block_size; slots at or
      past offset+L may hold anything (they are future to every query and masked).
    Returns float32 [B, H, L, n_blocks].
    """
    B, H, L, D = q.shape
    n_keys = offset + L
    n_blocks = -(-n_keys // block_size)
    qf = q.astype(mx.float32)
    q_pos = mx.arange(offset, offset + L)[:, None]
    tile_blocks = max(1, INDEX_TILE_ELEMENTS // (B * H * L * block_size))
    pooled = []
    for b0 in range(0, n_blocks, tile_blocks):
        b1 = min(n_blocks, b0 + tile_blocks)
        k0, k1 = b0 * block_size, b1 * block_size
        k = index_keys[:, :, k0:k1, :].astype(mx.float32)
        s = qf @ k.swapaxes(-1, -2)  # [B, H, L, T]
        if k1 - 1 > offset:  # some key in this tile is after some query
            s = mx.where(mx.arange(k0, k1)[None, :] <= q_pos, s, -mx.inf)
        pooled.append(s.reshape(B, H, L, b1 - b0, block_size).max(axis=-1))
    return pooled[0] if len(pooled) == 1 else mx.concatenate(pooled, axis=-1)


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


def sparse_attention(
    q: mx.array,
    k_blocks: mx.array,
    v_blocks: mx.array,
    idx: mx.array,
    valid: mx.array,
    offset: int,
    scale: float,
    index_head_of_group=None,
    kv_head_of_group=None,
) -> mx.array:
    """Attention of each query over its selected blocks only.

    q: [B, Hq, L, D]; k_blocks/v_blocks: [B, Hkv, n_blocks, bs, D] (views of the cache);
    idx/valid: [B, H_idx, L, k]. Returns [B, L, Hq, Dv] (ready for o_proj).
    """
    B, Hq, L, D = q.shape
    bs, Dv = k_blocks.shape[3], v_blocks.shape[-1]
    if index_head_of_group is None:
        index_head_of_group = list(range(idx.shape[1]))
        kv_head_of_group = list(range(k_blocks.shape[1]))
    G = len(index_head_of_group)
    Gq = Hq // G
    k = idx.shape[-1]
    if index_head_of_group != list(range(idx.shape[1])):
        sel = mx.array(index_head_of_group)
        idx, valid = idx[:, sel], valid[:, sel]
    same_heads = kv_head_of_group == list(range(k_blocks.shape[1]))

    per_query = G * k * bs * (D + Dv) * k_blocks.dtype.size
    q_tile = max(1, min(L, GATHER_TILE_BYTES // per_query))
    # Query heads in group-major order (head h is in group h // Gq, as repeat_kv does).
    qg = q.reshape(B, G, Gq, L, D)
    slot = mx.arange(bs)
    outs = []
    for l0 in range(0, L, q_tile):
        l1 = min(L, l0 + q_tile)
        Lt = l1 - l0
        blk = mx.where(valid[:, :, l0:l1], idx[:, :, l0:l1], 0)  # [B, G, Lt, k]
        if same_heads:
            ind = blk.reshape(B, G, Lt * k, 1, 1)
            kg = mx.take_along_axis(k_blocks, ind, axis=2)
            vg = mx.take_along_axis(v_blocks, ind, axis=2)
        else:
            bi = mx.arange(B).reshape(B, 1, 1, 1)
            hi = mx.array(kv_head_of_group).reshape(1, G, 1, 1)
            kg, vg = k_blocks[bi, hi, blk], v_blocks[bi, hi, blk]
        # [B, G, Lt*k, bs, D] -> one batch entry per (b, query), G heads, k*bs keys
        kg = kg.reshape(B, G, Lt, k * bs, D).transpose(0, 2, 1, 3, 4).reshape(B * Lt, G, k * bs, D)
        vg = vg.reshape(B, G, Lt, k * bs, Dv).transpose(0, 2, 1, 3, 4).reshape(B * Lt, G, k * bs, Dv)
        key_pos = blk[..., None] * bs + slot  # [B, G, Lt, k, bs]
        q_pos = mx.arange(offset + l0, offset + l1).reshape(1, 1, Lt, 1, 1)
        keep = (key_pos <= q_pos) & valid[:, :, l0:l1, :, None]
        keep = keep.reshape(B, G, Lt, 1, k * bs).transpose(0, 2, 1, 3, 4).reshape(B * Lt, G, 1, k * bs)
        # The group's query heads ride on the query axis: one SDPA "head" per group.
        qt = qg[:, :, :, l0:l1].transpose(0, 3, 1, 2, 4).reshape(B * Lt, G, Gq, D)
        o = mx.fast.scaled_dot_product_attention(qt, kg, vg, scale=scale, mask=keep)
        outs.append(o.reshape(B, Lt, Hq, Dv))
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1)


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
