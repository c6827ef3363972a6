"""One decoder layer's single-token step as a few compiled graphs.

Built op by op, a decode step of one layer is ~100 small kernels, each costing Python
graph building and a launch: on MLX's CUDA backend that is several times the layer's
matmuls (BENCHMARKS.md, "Whole model"). Here the step is four pieces:

  pre     input norm, q/k/v (+ index q/k) projections, QK norms, RoPE   (compiled per layer)
  writes  the cache writes, in place                                      (outside any graph)
  attend  block-sparse selection + attention                          (compiled, shared by all layers)
          or, on full-attention layers, SDPA over the cache's valid keys     (one kernel, uncompiled)
  post    o_proj, residual, post norm, MLP or MoE (router, experts,
          shared expert), residual                                        (compiled per layer)

The cache writes stay outside: inside a compiled graph MLX does not update a buffer in
place, and every token would copy the whole cache. `pre` and `post` depend on no shape
that changes while generating, so each layer traces them once; `attend` depends on the
cache capacity only (the position is an int32 array), and is shared by every layer with
the same constants. The math is the op-by-op path's (tests/test_decode.py holds them
equal); the step is used only where that path would take the same branch. What each
piece bought, and what was tried and dropped, is in BENCHMARKS.md ("Whole model").
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
from mlx_lm.models.cache import KVCache, QuantizedKVCache

from . import kvquant, msa
from .cache import SparseKVCache


def usable(layer, x: mx.array, cache) -> bool:
    """Whether the compiled step computes what layer(x, cache) would, op by op."""
    if x.shape[1] != 1 or cache is None or getattr(cache, "keys", None) is None:
        return False
    # Tensor-parallel layers sum partial results across ranks: leave them op by op.
    if layer.sharding_group is not None:
        return False
    attn = layer.self_attn
    if not attn.is_sparse:
        return type(cache) in (KVCache, QuantizedKVCache, kvquant.QuantizedSparseKVCache)
    if not isinstance(cache, (SparseKVCache, kvquant.QuantizedSparseKVCache)) or cache.index_keys is None:
        return False
    n_blocks = msa.n_blocks_for(cache.offset + 1, attn.block_size)
    n_idx = attn.indexer.n_heads
    return (n_blocks > attn.topk and attn.local_blocks >= 1
            and n_idx == attn.n_kv_heads and msa.group_maps(attn.n_heads, attn.n_kv_heads, n_idx)[0] == n_idx)


_POSITION = [None, None]


def position(offset: int) -> mx.array:
    """The int32 position array of this token, made once per token, not once per layer."""
    if _POSITION[0] != offset:
        _POSITION[0], _POSITION[1] = offset, mx.array(offset, dtype=mx.int32)
    return _POSITION[1]


def pieces(layer):
    """The layer's compiled (pre, post), made on first use."""
    fns = layer.__dict__.get("_decode_fns")
    if fns is None:
        # `inputs=layer`: the graphs read the layer's current weights on every call, so
        # weights loaded or replaced after the first token are used, not stale copies.
        post = partial(_post, layer)
        # Streamed experts read the router's choices on the host (and disk), and a trace keeps
        # them: neither can run inside a graph.
        if getattr(layer.mlp, "streamed", None) is None and getattr(layer.mlp, "trace", None) is None:
            post = mx.compile(post, inputs=layer)
        fns = (mx.compile(partial(_pre, layer), inputs=layer), post)
        layer.__dict__["_decode_fns"] = fns
    return fns


def step(layer, x: mx.array, cache) -> mx.array:
    pre, post = pieces(layer)
    attn = layer.self_attn
    pos = position(cache.offset)
    if attn.is_sparse:
        q, k, v, idx_q, idx_k = pre(x, pos)
        cache.update_index(idx_k)
        cache.update_and_fetch(k, v)
        attend = kvquant.decode_step(attn.scale, attn.block_size, attn.topk, attn.local_blocks, cache)
        o = attend(q, idx_q, cache.keys, cache.values, cache.index_keys, pos)
    else:
        q, k, v = pre(x, pos)
        keys, values = cache.update_and_fetch(k, v)
        o = kvquant.dense_attention(q, keys, values, attn.scale, cache)
    return post(x, o)


def _pre(layer, x, pos):
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    B = x.shape[0]
    q = attn.q_norm(attn.q_proj(h).reshape(B, 1, attn.n_heads, -1)).transpose(0, 2, 1, 3)
    k = attn.k_norm(attn.k_proj(h).reshape(B, 1, attn.n_kv_heads, -1)).transpose(0, 2, 1, 3)
    v = attn.v_proj(h).reshape(B, 1, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    q, k = attn.rope(q, offset=pos), attn.rope(k, offset=pos)
    if not attn.is_sparse:
        return q, k, v
    idx_q, idx_k = attn.indexer(h, pos)
    return q, k, v, idx_q, idx_k


def _post(layer, x, o):
    h = x + layer.self_attn.o_proj(o.reshape(x.shape[0], 1, -1))
    return h + layer.mlp(layer.post_attention_layernorm(h))
