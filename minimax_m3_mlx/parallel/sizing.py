"""Per-rank memory: weights, caches and transient buffers, shared by the per-rank loader and `plan`.

A tensor table (weights.sharding.table_from_arrays of a model or a checkpoint's dry run,
or `table_from_shapes` of what convert.recipes.output_tensors writes) goes through
`rank_usage` and `cache_bytes`, so `minimax-m3 plan`'s figures are the loader's and the
caches': not an approximation of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from ..io.dtypes import DTYPES
from ..model import msa
from ..model.experts import EXPERTS
from ..sizes import cache_step, ceil_div
from ..weights.sharding import (
    ShardingError, TensorInfo, default_split, is_embedding, layer_of, local_shape, split_name, stage_layers,
    tensor_rule,
)


def table_from_shapes(tensors: Dict[str, Tuple[Tuple[int, ...], str]]) -> Dict[str, TensorInfo]:
    """name -> TensorInfo from (shape, safetensors tag) pairs, e.g. convert.recipes.output_tensors'."""
    out = {}
    for k, (shape, tag) in tensors.items():
        path, part = split_name(k)
        out[k] = TensorInfo(tuple(shape), DTYPES[tag].itemsize, path, part)
    return out


@dataclass
class RankUsage:
    rank: int
    stage: int
    tensor_rank: int
    layers: Tuple[int, int]
    tensors: Dict[str, Tuple[int, ...]]  # global name -> local shape
    weight_bytes: int
    replicated_bytes: int  # whole tensors this rank holds
    sharded_bytes: int  # its slices of tensor-parallel tensors
    embed: bool
    expert_bytes: int = 0  # of weight_bytes, the routed experts' (what --expert-memory streams instead)


def rank_usage(args, table: Dict[str, TensorInfo], tensor: int, pipeline: int, rank: int,
               split: Optional[Sequence[int]] = None) -> RankUsage:
    """What rank `rank` holds under tensor x pipeline parallelism (global tensor names)."""
    stage, t_rank = divmod(rank, tensor)
    if split is None:
        split = default_split(args, table, pipeline)
    start, end = stage_layers(split, stage)
    keep_embed = stage == pipeline - 1 or args.tie_word_embeddings
    tensors, total, rep, shard, routed = {}, 0, 0, 0, 0
    for name, info in table.items():
        i = layer_of(name)
        if i is not None:
            if not start <= i < end:
                continue
        elif is_embedding(name) and not keep_embed:
            continue
        rule = tensor_rule(name) if tensor > 1 else None
        shape = local_shape(info.shape, rule, tensor)
        b = int(np.prod(shape, dtype=np.int64)) * info.itemsize if shape else info.itemsize
        tensors[name] = shape
        total += b
        routed += b if EXPERTS in name else 0
        if rule is None:
            rep += b
        else:
            shard += b
    return RankUsage(rank, stage, t_rank, (start, end), tensors, total, rep, shard, keep_embed, routed)


def _row_bytes(dim: int, bits: Optional[int], group_size: int, dtype_bytes: int) -> int:
    """Bytes of one cached row of `dim` values: plain (bits 16 / 32 / None) or mx.quantize's
    packed words plus a scale and a bias per group, in the model dtype."""
    if bits in (4, 8):
        return dim * bits // 8 + 2 * (dim // group_size) * dtype_bytes
    return dim * (4 if bits == 32 else dtype_bytes)


def cache_bytes(args, context: int, tensor: int = 1, layers: Optional[Tuple[int, int]] = None,
                batch: int = 1, dtype_bytes: int = 2, kv_bits: Optional[int] = None,
                index_bits: Optional[int] = None, group_size: int = 64) -> Tuple[int, int]:
    """(K+V bytes, index-key bytes) of one rank's caches after `context` tokens.

    Counts what the caches allocate: mlx-lm's KVCache / QuantizedKVCache and SparseKVCache /
    QuantizedSparseKVCache grow in steps (sizes.cache_step: the same formula), so this is
    the buffers' size. `kv_bits` (--kv-bits) quantizes K/V and, at 8 bits unless
    `index_bits` says otherwise, the index keys.
    """
    start, end = layers or (0, args.num_hidden_layers)
    kv = idx = 0
    if index_bits is None:
        index_bits = 8 if kv_bits else 32 if getattr(args, "index_cache_dtype", "model") == "float32" else None
    kv_row = _row_bytes(args.head_dim, kv_bits, group_size, dtype_bytes)
    idx_row = _row_bytes(args.index_head_dim, index_bits, group_size, dtype_bytes)
    for i in range(start, end):
        step = cache_step(args.index_block_size if args.is_sparse_attention(i) else None)
        cap = ceil_div(context, step) * step if context > 0 else 0
        kv += 2 * batch * (args.num_key_value_heads // tensor) * cap * kv_row
        if args.is_sparse_attention(i):
            idx += batch * cap * idx_row
    return kv, idx


def activation_bytes(args, chunk: int, tensor: int = 1, batch: int = 1, dtype_bytes: int = 2,
                     context: int = 0) -> int:
    """An upper estimate of the transient memory of one prefill chunk on one rank.

    The largest of: the MoE block (routed copies of the tokens, gate/up/down outputs and
    the float32 weighted sum), the attention block (q/k/v/out, the bounded index-score and
    block-gather tiles of msa.py, the per-block scores), and the final chunk's logits;
    plus a few hidden-state buffers live across the whole layer.
    """
    T = batch * chunk
    H, k = args.hidden_size, args.num_experts_per_tok
    inter = max(args.intermediate_size, args.shared_intermediate_size) // tensor
    dense_inter = args.dense_intermediate_size // tensor
    hidden = 4 * T * H * dtype_bytes
    moe = T * k * (2 * H + 3 * inter) * dtype_bytes + T * k * H * 4 + T * 3 * inter * dtype_bytes
    dense = T * 3 * dense_inter * dtype_bytes
    heads, kv = args.num_attention_heads // tensor, args.num_key_value_heads // tensor
    qkv = T * (2 * heads + 2 * kv) * args.head_dim * dtype_bytes
    n_blocks = ceil_div(max(context, chunk), args.index_block_size)
    idx_heads = max(1, args.index_n_heads // tensor)
    groups = max(kv, idx_heads)
    per_query = groups * args.index_topk_blocks * args.index_block_size * 2 * args.head_dim * dtype_bytes
    sparse = (min(msa.INDEX_TILE_ELEMENTS, T * idx_heads * max(context, chunk)) * 4
              + T * idx_heads * n_blocks * 4 + min(msa.GATHER_TILE_BYTES, T * per_query) * 2)
    logits = T * args.vocab_size * (dtype_bytes + 4)
    return hidden + max(moe, dense, qkv + sparse, logits)


def plan_layout(n: int, mode: str = "tensor", tensor: Optional[int] = None) -> Tuple[int, int]:
    """(tensor size, pipeline size) for `mode` over n ranks."""
    if mode == "tensor":
        return n, 1
    if mode == "pipeline":
        return 1, n
    if mode == "both":
        t = tensor or 2
        if n % t or n // t < 2 or t < 2:
            raise ShardingError(
                f"mode='both' needs at least 2 tensor-parallel ranks in each of at least 2 pipeline stages; "
                f"{n} ranks do not split into stages of {t} (use 4 ranks or more, e.g. 2x2)"
            )
        return t, n // t
    raise ShardingError(f"unknown mode {mode!r}: choose 'tensor', 'pipeline' or 'both'")
