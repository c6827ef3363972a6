"""An MSA layer computed the reference's way: dense attention under the selection's mask.

For tests and measurements only: the [B, Hq, L, S] mask is exactly what the block-sparse
path exists to avoid. Same projections, cache writes, scores and selection as
Attention.__call__; only the attention over the selected blocks differs.
"""

from __future__ import annotations

from minimax_m3_mlx.model import msa
from minimax_m3_mlx.model.cache import SparseKVCache


def masked_forward(attn, x, cache=None):
    """attn(x, cache) for a sparse Attention layer, with masked dense attention."""
    B, L, _ = x.shape
    if cache is None:
        cache = SparseKVCache(attn.block_size, attn.index_dtype)
    offset = cache.offset
    q = attn.q_norm(attn.q_proj(x).reshape(B, L, attn.n_heads, -1)).transpose(0, 2, 1, 3)
    k = attn.k_norm(attn.k_proj(x).reshape(B, L, attn.n_kv_heads, -1)).transpose(0, 2, 1, 3)
    v = attn.v_proj(x).reshape(B, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    q, k = attn.rope(q, offset=offset), attn.rope(k, offset=offset)
    idx_q, idx_k = attn.indexer(x, offset)
    index_keys = cache.update_index(idx_k)
    keys, values = cache.update_and_fetch(k, v)
    n_keys = offset + L
    if msa.n_blocks_for(n_keys, attn.block_size) <= attn.topk:
        out = msa.dense_attention(q, keys, values, attn.scale)
    else:
        scores = msa.index_block_scores(idx_q, index_keys, offset, attn.block_size)
        idx, valid = msa.select_blocks(scores, offset, attn.block_size, attn.topk, attn.local_blocks)
        mask = msa.block_mask(idx, valid, offset, n_keys, attn.block_size, attn.n_heads)
        out = msa.dense_attention(q, keys, values, attn.scale, mask=mask)
    return attn.o_proj(out.reshape(B, L, -1))
