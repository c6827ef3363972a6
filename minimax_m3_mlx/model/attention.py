"""GQA attention with per-head Gemma QK norm and partial RoPE; MSA on the sparse layers."""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_inplace
from mlx_lm.models.cache import BatchKVCache

from . import batch_msa, kvquant, msa
from .batch_cache import BatchSparseCache
from .cache import SparseKVCache
from ..config import ModelArgs
from .layers import GemmaRMSNorm, partial_rope


class Indexer(nn.Module):
    """The index branch: one shared index key per token, `index_n_heads` index queries."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.index_n_heads
        self.head_dim = args.index_head_dim
        self.q_proj = nn.Linear(args.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(args.hidden_size, self.head_dim, bias=False)
        self.q_norm = GemmaRMSNorm(self.head_dim, eps=args.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(self.head_dim, eps=args.rms_norm_eps)
        # The reference cuts the main branch's cos/sin to the index head width.
        self.rope = partial_rope(args, min(args.rotary_dim, self.head_dim))

    def __call__(self, x: mx.array, offset: int):
        B, L, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(B, L, self.n_heads, self.head_dim)).transpose(0, 2, 1, 3)
        k = self.k_norm(self.k_proj(x).reshape(B, L, 1, self.head_dim)).transpose(0, 2, 1, 3)
        return self.rope(q, offset=offset), self.rope(k, offset=offset)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = self.head_dim**-0.5
        h, d = args.hidden_size, self.head_dim
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=False)
        self.q_norm = GemmaRMSNorm(d, eps=args.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(d, eps=args.rms_norm_eps)
        self.rope = partial_rope(args, args.rotary_dim)

        self.is_sparse = args.is_sparse_attention(layer_idx)
        if self.is_sparse:
            self.indexer = Indexer(args)
            self.block_size = args.index_block_size
            self.topk = args.index_topk_blocks
            self.local_blocks = args.index_local_blocks
            self.index_dtype = "float32" if args.index_cache_dtype == "float32" else None

    def __call__(self, x: mx.array, cache: Optional[object] = None) -> mx.array:
        B, L, _ = x.shape
        offset = cache.offset if cache is not None else 0
        q = self.q_norm(self.q_proj(x).reshape(B, L, self.n_heads, -1)).transpose(0, 2, 1, 3)
        k = self.k_norm(self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        q = self.rope(q, offset=offset)
        k = self.rope(k, offset=offset)

        if isinstance(cache, BatchSparseCache):
            out = (batch_msa.attend(self, x, q, k, v, cache) if self.is_sparse
                   else batch_msa.attend_full(q, k, v, cache, self.scale))
        elif self.is_sparse:
            out = self._sparse(x, q, k, v, cache, offset)
        else:
            # mlx-lm's BatchKVCache left-pads rows: its mask hides the padding (made before the write).
            mask = cache.make_mask(L) if isinstance(cache, BatchKVCache) else None
            if cache is not None:
                k, v = cache.update_and_fetch(k, v)
            out = kvquant.dense_attention(q, k, v, self.scale, cache, mask)
        return self.o_proj(out.reshape(B, L, -1))

    def _sparse(self, x, q, k, v, cache, offset):
        if cache is None:  # a plain forward still needs block-aligned storage
            cache = SparseKVCache(self.block_size, self.index_dtype)
        idx_q, idx_k = self.indexer(x, offset)
        L = q.shape[2]
        n_keys = offset + L
        n_blocks = msa.n_blocks_for(n_keys, self.block_size)
        n_groups, kv_map, ix_map = msa.group_maps(self.n_heads, self.n_kv_heads, idx_q.shape[1])
        if (L == 1 and n_blocks > self.topk and self.local_blocks >= 1
                and n_groups == self.n_kv_heads == idx_q.shape[1] and cache.keys is not None):
            return self._decode(q, k, v, idx_q, idx_k, cache, offset)
        index_keys = cache.update_index(idx_k)
        keys, values = cache.update_and_fetch(k, v)
        if n_blocks <= self.topk:
            # Every block is kept: the selection is the causal mask, and dense is exact.
            # This is the only crossover: once a block is dropped, dense attention is a
            # different model, whatever it would save (BENCHMARKS.md measures both).
            return kvquant.dense_attention(q, keys, values, self.scale, cache)
        scores = msa.index_block_scores(idx_q, index_keys, offset, self.block_size)
        idx, valid = msa.select_blocks(scores, offset, self.block_size, self.topk, self.local_blocks)
        keys, values = kvquant.as_rows(cache.keys, cache.kv_quant), kvquant.as_rows(cache.values, cache.kv_quant)
        return msa.sparse_attention(q, keys, values, idx, valid, offset, self.scale,
                                    self.block_size, ix_map, kv_map)

    def _decode(self, q, k, v, idx_q, idx_k, cache, offset):
        """One token: in-place cache writes, then the compiled step (see msa._decode_step)."""
        cache.update_index(idx_k)
        cache.update_and_fetch(k, v)
        step = kvquant.decode_step(self.scale, self.block_size, self.topk, self.local_blocks, cache)
        return step(q, idx_q, cache.keys, cache.values, cache.index_keys, mx.array(offset, dtype=mx.int32))

    def shard(self, group) -> None:
        """Keep this rank's KV groups, their query heads and the index heads that serve them
        (index head h serves KV group h); the single index key stays whole. The output is
        then this rank's partial sum (DecoderLayer sums it)."""
        n = group.size()
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            shard_inplace(proj, "all-to-sharded", group=group)
        shard_inplace(self.o_proj, "sharded-to-all", group=group)
        self.n_heads //= n
        self.n_kv_heads //= n
        if self.is_sparse:
            shard_inplace(self.indexer.q_proj, "all-to-sharded", group=group)
            self.indexer.n_heads //= n
