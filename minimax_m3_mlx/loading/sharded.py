"""Distributed inference over `mx.distributed`: tensor parallel, pipeline parallel, and both.

Tensor parallel (`Model.shard(group)`, 2 or 4 ranks for MiniMax-M3)
    Query, KV and index heads are split by KV group: rank r owns KV heads
    [r*Hkv/N, (r+1)*Hkv/N), the query heads of those groups and the index heads that serve
    them (index head h serves KV group h), so every group's block selection is computed on
    one rank from exactly the index scores the single-machine model computes. The single
    index key per token (`indexer.k_proj`) is replicated. `o_proj` is sharded-to-all (one
    all-sum). Routed experts (every expert's slice of the intermediate dimension), the
    shared expert and the dense MLPs are split along the intermediate dimension; an MoE
    block ends in one all-sum over routed + shared, a dense MLP in one all-sum in its
    `down_proj`. Embeddings, lm_head, norms and the router are replicated.

Pipeline parallel (`Model.pipeline(group)`, 2..8 ranks)
    Layers are split into contiguous stages balanced by weight bytes (dense first layers
    counted as they are, the embedding counted on the first stage). As in mlx-lm's
    PipelineMixin, the last rank runs the first layers and rank 0 the last ones; hidden
    states travel rank r+1 -> r, and one all_gather at the end gives every rank rank 0's
    output, so every rank returns the same logits (what mlx-lm's generate loop needs).
    After `pipeline()`, `Model.layers` holds only the rank's layers (numbered from 0;
    `layer_offset` maps back) and only the first stage keeps the embedding.

Both (`make_groups(group, tensor=T)`, or `load_sharded(..., mode="both", tensor=T)`:
    P = N/T stages of T tensor-parallel ranks)
    mlx-lm combines the two with subgroups from `Group.split`, which the ring backend
    does not implement ("[ring] Group split not supported"). Here stages are runs of T
    consecutive ranks, and both the tensor-parallel sums inside a stage and the hand-over
    between stages are point-to-point sends between neighbouring ranks, which every
    backend supports (the ring one only between neighbours). See `Line` and `Stages`.

Loading (`load_sharded`)
    Every rank reads only what it keeps: the tensors of its layers, and of those only its
    slice (its heads, its part of every expert's intermediate dimension), from the
    safetensors files by offset. Per-rank resident weight bytes are the replicated tensors
    plus 1/N of the sharded ones (tensor parallel) or the rank's layers (pipeline).

Sizing is shared by the loader and `minimax-m3 plan`: a tensor table (`inspect_checkpoint`
from a folder's headers, or recipes.output_tensors for a config and a recipe) goes through
`rank_usage` and `cache_bytes`, so the plan's figures are the loader's.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.nn.layers.distributed import shard_linear
from mlx.utils import tree_flatten


class ShardingError(ValueError):
    """A rank count or layout the model cannot be split into (raised before anything changes)."""


# =============================================================================================
# Which tensors are split, and how
# =============================================================================================
COL = "all-to-sharded"  # split the output axis (ndim-2): q/k/v, index q, gate/up projections
ROW = "sharded-to-all"  # split the input axis (last): o_proj, down projections

# Parts of a module's tensors that follow the module's split. Quantised layers keep
# weight/scales/biases aligned; source checkpoints carry weight_scale_inv next to weight.
_PARTS = ("weight", "scales", "biases", "bias", "weight_scale_inv", "weight_scale")

# Module paths (this package's names, and the published / transformers 5.x spellings).
_RULES: List[Tuple[re.Pattern, str, int]] = [
    (re.compile(r"\.self_attn\.(q|k|v)_proj$"), COL, 1),
    (re.compile(r"\.self_attn\.o_proj$"), ROW, 1),
    (re.compile(r"\.self_attn\.(indexer\.q_proj|index_q_proj)$"), COL, 1),
    (re.compile(r"\.(switch_mlp|shared_experts|mlp)\.(gate|up)_proj$"), COL, 1),
    (re.compile(r"\.experts\.\d+\.(w1|w3)$"), COL, 1),
    (re.compile(r"\.(experts|shared_experts|mlp)\.gate_up_proj$"), COL, 2),  # fused: per segment
    (re.compile(r"\.(switch_mlp|shared_experts|mlp|experts)\.down_proj$"), ROW, 1),
    (re.compile(r"\.experts\.\d+\.w2$"), ROW, 1),
]
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class Rule:
    kind: str  # COL or ROW
    segments: int = 1

    def axis(self, ndim: int) -> int:
        return max(ndim - 2, 0) if self.kind == COL else ndim - 1


def split_name(name: str) -> Tuple[str, str]:
    """(module path, part) of a tensor name; a name without a known part is its own path."""
    path, _, part = name.rpartition(".")
    if part in _PARTS:
        return path, part
    return name, ""


def tensor_rule(name: str) -> Optional[Rule]:
    """How tensor parallelism splits this tensor (any checkpoint spelling); None: replicated."""
    path, part = split_name(name)
    for pattern, kind, segments in _RULES:
        if pattern.search(path):
            if kind == ROW and part == "bias":
                return None  # added once, after the sum
            return Rule(kind, segments)
    return None


def layer_of(name: str) -> Optional[int]:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def is_embedding(name: str) -> bool:
    return "embed_tokens." in name


def chunk_bounds(length: int, segments: int, n: int, r: int) -> List[Tuple[int, int]]:
    """[start, end) ranges of rank r's part of an axis made of `segments` equal segments."""
    seg = length // segments
    c = seg // n
    return [(s * seg + r * c, s * seg + (r + 1) * c) for s in range(segments)]


def local_shape(shape: Sequence[int], rule: Optional[Rule], n: int) -> Tuple[int, ...]:
    shape = tuple(int(d) for d in shape)
    if rule is None or n == 1:
        return shape
    a = rule.axis(len(shape))
    return shape[:a] + (shape[a] // n,) + shape[a + 1:]


def take_slice(x, rule: Optional[Rule], n: int, r: int, concat):
    """Rank r's slice of x (numpy or mlx array) under `rule`; `concat(parts, axis)` joins segments."""
    if rule is None or n == 1:
        return x
    a = rule.axis(x.ndim)
    parts = []
    for lo, hi in chunk_bounds(x.shape[a], rule.segments, n, r):
        idx = [slice(None)] * x.ndim
        idx[a] = slice(lo, hi)
        parts.append(x[tuple(idx)])
    return parts[0] if len(parts) == 1 else concat(parts, a)


# =============================================================================================
# Validation (before anything is modified)
# =============================================================================================
def check_tensor_parallel(args, table: Dict[str, "TensorInfo"], n: int) -> None:
    """Raise ShardingError unless tensor parallelism over n ranks is exact for this model."""
    if n < 1:
        raise ShardingError(f"tensor parallel size must be >= 1, got {n}")
    if n == 1:
        return
    heads = [("num_attention_heads", args.num_attention_heads), ("num_key_value_heads", args.num_key_value_heads)]
    if args.has_sparse_attention:
        heads.append(("index_n_heads", args.index_n_heads))
    bad = [f"{k}={v}" for k, v in heads if v % n]
    if bad:
        counts = "/".join(str(v) for _, v in heads)
        raise ShardingError(
            f"tensor parallel over {n} ranks: {n} does not divide {', '.join(bad)}. Each rank must own "
            f"whole KV groups and the index heads that select their blocks, so the rank count must divide "
            f"the attention, KV and index heads ({counts}): {_divisors(math.gcd(*(v for _, v in heads)))} "
            f"ranks. Use pipeline parallelism (mode='pipeline') for other rank counts."
        )
    for name, info in table.items():
        rule = tensor_rule(name)
        if rule is None:
            if info.part == "bias" and tensor_rule(info.path + ".weight") is not None:
                raise ShardingError(f"{name}: a bias on a sharded-to-all layer is not supported")
            continue
        a = rule.axis(len(info.shape))
        if info.shape[a] % (n * rule.segments):
            what = f"{rule.segments} segments of " if rule.segments > 1 else ""
            raise ShardingError(
                f"tensor parallel over {n} ranks: {name} has {info.shape[a]} along axis {a}, which does not "
                f"split into {what}{n} equal parts"
                + (" (quantisation groups must not straddle ranks: use a smaller group size or fewer ranks)"
                   if info.part in ("scales", "biases") else "")
            )


def _divisors(g: int) -> str:
    ds = [d for d in range(1, g + 1) if g % d == 0] if g > 0 else [1]
    return ", ".join(map(str, ds[:-1])) + (" or " if len(ds) > 1 else "") + str(ds[-1])


def check_pipeline(n_layers: int, stages: int, split: Optional[Sequence[int]] = None) -> None:
    if stages < 1:
        raise ShardingError(f"pipeline size must be >= 1, got {stages}")
    if stages > n_layers:
        raise ShardingError(
            f"pipeline over {stages} stages needs at least one layer per stage; the model has {n_layers} layers"
        )
    if split is not None:
        if len(split) != stages:
            raise ShardingError(f"split {list(split)} has {len(split)} entries for {stages} stages")
        if any(int(s) < 1 for s in split) or sum(split) != n_layers:
            raise ShardingError(f"split {list(split)} must be positive and sum to {n_layers} layers")


# =============================================================================================
# Tensor tables and per-rank sizes (shared by the loader and `minimax-m3 plan`)
# =============================================================================================
@dataclass(frozen=True)
class TensorInfo:
    shape: Tuple[int, ...]
    itemsize: int
    path: str = ""
    part: str = ""

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.itemsize if self.shape else self.itemsize


def table_from_arrays(arrays: Dict[str, Any]) -> Dict[str, TensorInfo]:
    """name -> TensorInfo from arrays (lazy arrays are fine: only shapes and dtypes are read)."""
    out = {}
    for k, v in arrays.items():
        path, part = split_name(k)
        out[k] = TensorInfo(tuple(v.shape), v.dtype.size, path, part)
    return out


def table_from_shapes(tensors: Dict[str, Tuple[Tuple[int, ...], str]]) -> Dict[str, TensorInfo]:
    """name -> TensorInfo from recipes.output_tensors' (shape, safetensors tag)."""
    from ..convert.recipes import TAG_BYTES

    out = {}
    for k, (shape, tag) in tensors.items():
        path, part = split_name(k)
        out[k] = TensorInfo(tuple(shape), TAG_BYTES[tag], path, part)
    return out


def layer_bytes(table: Dict[str, TensorInfo], n_layers: int) -> List[int]:
    b = [0] * n_layers
    for k, info in table.items():
        i = layer_of(k)
        if i is not None and i < n_layers:
            b[i] += info.nbytes
    return b


def balanced_split(per_layer: Sequence[int], stages: int, first_extra: int = 0) -> List[int]:
    """Layer counts per stage (mlx-lm's order: entry s for stage s; the last stage runs the
    first layers) minimising the largest stage's bytes; `first_extra` (the embedding) is
    held by the stage that runs layer 0."""
    n = len(per_layer)
    check_pipeline(n, stages)
    pre = [0]
    for b in per_layer:
        pre.append(pre[-1] + int(b))
    INF = float("inf")
    # best[k][i]: the smallest max load for layers [0, i) in k parts; cut[k][i]: last part start.
    best = [[INF] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for k in range(1, stages + 1):
        for i in range(k, n - (stages - k) + 1):
            for j in range(k - 1, i):
                load = pre[i] - pre[j] + (first_extra if j == 0 else 0)
                v = max(best[k - 1][j], load)
                if v < best[k][i]:
                    best[k][i], cut[k][i] = v, j
    counts, i = [], n
    for k in range(stages, 0, -1):
        j = cut[k][i]
        counts.append(i - j)
        i = j
    # counts is now in reverse layer order: counts[0] = last layers = stage 0.
    return counts


def stage_layers(split: Sequence[int], stage: int) -> Tuple[int, int]:
    """[start, end) of the layers of `stage` (stage s starts after the layers of stages > s)."""
    start = sum(split[stage + 1:])
    return start, start + split[stage]


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


def rank_usage(args, table: Dict[str, TensorInfo], tensor: int, pipeline: int, rank: int,
               split: Optional[Sequence[int]] = None) -> RankUsage:
    """What rank `rank` holds under tensor x pipeline parallelism (global tensor names)."""
    stage, t_rank = divmod(rank, tensor)
    if split is None:
        split = default_split(args, table, pipeline)
    start, end = stage_layers(split, stage)
    keep_embed = stage == pipeline - 1 or args.tie_word_embeddings
    tensors, total, rep, shard = {}, 0, 0, 0
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
        if rule is None:
            rep += b
        else:
            shard += b
    return RankUsage(rank, stage, t_rank, (start, end), tensors, total, rep, shard, keep_embed)


def default_split(args, table: Dict[str, TensorInfo], pipeline: int) -> List[int]:
    if pipeline == 1:
        return [args.num_hidden_layers]
    embed = 0 if args.tie_word_embeddings else sum(i.nbytes for k, i in table.items() if is_embedding(k))
    return balanced_split(layer_bytes(table, args.num_hidden_layers), pipeline, embed)


def cache_bytes(args, context: int, tensor: int = 1, layers: Optional[Tuple[int, int]] = None,
                batch: int = 1, dtype_bytes: int = 2) -> Tuple[int, int]:
    """(K+V bytes, index-key bytes) of one rank's caches after `context` tokens.

    Counts what the caches allocate: mlx-lm's KVCache and SparseKVCache grow in steps
    (256 tokens; whole index blocks for the sparse cache), so this is the buffers' size.
    """
    from ..model.cache import SparseKVCache

    start, end = layers or (0, args.num_hidden_layers)
    kv = idx = 0
    idx_bytes = 4 if getattr(args, "index_cache_dtype", "model") == "float32" else dtype_bytes
    for i in range(start, end):
        if args.is_sparse_attention(i):
            step = SparseKVCache(args.index_block_size).step
        else:
            step = 256
        cap = -(-context // step) * step if context > 0 else 0
        kv += 2 * batch * (args.num_key_value_heads // tensor) * cap * args.head_dim * dtype_bytes
        if args.is_sparse_attention(i):
            idx += batch * cap * args.index_head_dim * idx_bytes
    return kv, idx


def activation_bytes(args, chunk: int, tensor: int = 1, batch: int = 1, dtype_bytes: int = 2,
                     context: int = 0) -> int:
    """An upper estimate of the transient memory of one prefill chunk on one rank.

    The largest of: the MoE block (routed copies of the tokens, gate/up/down outputs and
    the float32 weighted sum), the attention block (q/k/v/out, the bounded index-score and
    block-gather tiles of msa.py, the per-block scores), and the final chunk's logits;
    plus a few hidden-state buffers live across the whole layer.
    """
    from ..model import msa

    T = batch * chunk
    H, k = args.hidden_size, args.num_experts_per_tok
    inter = max(args.intermediate_size, args.shared_intermediate_size) // tensor
    dense_inter = args.dense_intermediate_size // tensor
    hidden = 4 * T * H * dtype_bytes
    moe = T * k * (2 * H + 3 * inter) * dtype_bytes + T * k * H * 4 + T * 3 * inter * dtype_bytes
    dense = T * 3 * dense_inter * dtype_bytes
    heads, kv = args.num_attention_heads // tensor, args.num_key_value_heads // tensor
    qkv = T * (2 * heads + 2 * kv) * args.head_dim * dtype_bytes
    n_blocks = -(-max(context, chunk) // args.index_block_size)
    idx_heads = max(1, args.index_n_heads // tensor)
    groups = max(kv, idx_heads)
    per_query = groups * args.index_topk_blocks * args.index_block_size * 2 * args.head_dim * dtype_bytes
    sparse = (min(msa.INDEX_TILE_ELEMENTS, T * idx_heads * max(context, chunk)) * 4
              + T * idx_heads * n_blocks * 4 + min(msa.GATHER_TILE_BYTES, T * per_query) * 2)
    logits = T * args.vocab_size * (dtype_bytes + 4)
    return hidden + max(moe, dense, qkv + sparse, logits)


# =============================================================================================
# Point-to-point collectives (work on every backend, ring included)
# =============================================================================================
def _sched(x: mx.array) -> mx.array:
    """Put a send/recv on its stream now, in program order.

    Sends and receives have no data dependency that orders them against the other
    transfers of the same rank; scheduling each at creation keeps every rank's transfers
    in the order the protocol below was written for, which is deadlock free.
    """
    mx.async_eval(x)
    return x


class Line:
    """A run of consecutive ranks of `group` used as a tensor-parallel group without `split`.

    all_sum: partial sums travel left to right ((x0 + x1) + x2) + ..., and the last rank's
    total travels back, so every member gets bitwise the same sum. All transfers are
    between neighbouring ranks.
    """

    def __init__(self, group, members: Sequence[int]):
        self.group = group
        self.members = list(members)
        if group.rank() not in self.members:
            raise ValueError(f"rank {group.rank()} is not in {self.members}")
        if self.members != list(range(self.members[0], self.members[0] + len(self.members))):
            raise ValueError(f"members must be consecutive ranks, got {self.members}")
        self.index = self.members.index(group.rank())

    def rank(self) -> int:
        return self.index

    def size(self) -> int:
        return len(self.members)

    def all_sum(self, x: mx.array) -> mx.array:
        n, i, g, ms = len(self.members), self.index, self.group, self.members
        if n == 1:
            return x
        if i > 0:
            x = _sched(mx.distributed.recv_like(x, ms[i - 1], group=g)) + x
        if i < n - 1:
            _sched(mx.distributed.send(x, ms[i + 1], group=g))
            total = _sched(mx.distributed.recv_like(x, ms[i + 1], group=g))
        else:
            total = x
        if i > 0:
            sent = _sched(mx.distributed.send(total, ms[i - 1], group=g))
            total = mx.depends(total, sent)
        return total


class Stages:
    """Pipeline stages of `tensor` consecutive ranks each over `group` (tensor=1: one rank each).

    Stage s is ranks [s*T, (s+1)*T); stage P-1 runs the first layers, stage 0 the last
    (as mlx-lm, so that rank 0 holds the output). Between stages the hidden state goes
    from the first rank of stage s+1 to the last rank of stage s (neighbours), and on
    down that stage rank by rank.
    """

    def __init__(self, group, tensor: int = 1):
        n = group.size()
        if tensor < 1 or n % tensor:
            raise ShardingError(f"{n} ranks do not split into stages of {tensor} tensor-parallel ranks")
        self.group = group
        self.tensor = tensor
        self.rank_ = group.rank()
        self.stage = self.rank_ // tensor

    def rank(self) -> int:
        return self.stage

    def size(self) -> int:
        return self.group.size() // self.tensor

    @property
    def first(self) -> bool:  # runs layer 0
        return self.stage == self.size() - 1

    @property
    def last(self) -> bool:  # runs the final layer; holds rank 0
        return self.stage == 0

    def tensor_group(self):
        """The tensor-parallel group of this rank's stage (None when stages are single ranks)."""
        if self.tensor == 1:
            return None
        if self.size() == 1:
            return self.group
        s = self.stage * self.tensor
        return Line(self.group, range(s, s + self.tensor))

    def receive(self, shape, dtype) -> mx.array:
        r, g = self.rank_, self.group
        h = _sched(mx.distributed.recv(shape, dtype, r + 1, group=g))
        if r % self.tensor:  # pass it on down this stage
            sent = _sched(mx.distributed.send(h, r - 1, group=g))
            h = mx.depends(h, sent)
        return h

    def send(self, h: mx.array) -> mx.array:
        r = self.rank_
        if self.stage > 0 and r % self.tensor == 0:
            sent = _sched(mx.distributed.send(h, r - 1, group=self.group))
            h = mx.depends(h, sent)
        return h

    def gather_output(self, h: mx.array) -> mx.array:
        """Every rank gets rank 0's (the last stage's) hidden state."""
        return mx.distributed.all_gather(h, group=self.group)[: h.shape[0]]


def make_groups(group=None, tensor: int = 1):
    """(tensor group, pipeline Stages) for `tensor` x (N / tensor) parallelism over `group`.

    tensor == N: the group itself for tensor parallelism, no pipeline. tensor == 1: a
    pipeline of N single-rank stages. Otherwise stages of `tensor` consecutive ranks.
    """
    group = group or mx.distributed.init()
    n = group.size()
    if tensor < 1 or n % tensor:
        raise ShardingError(f"{n} ranks do not split into tensor-parallel groups of {tensor}")
    if tensor == n:
        return (group if n > 1 else None), None
    stages = Stages(group, tensor)
    return stages.tensor_group(), stages


# =============================================================================================
# Model.shard
# =============================================================================================
def _slice_module(module: nn.Module, rule: Rule, n: int, r: int) -> None:
    """Replace a (quantised) linear's tensors by rank r's slices, in place."""
    new = {}
    for part in ("weight", "scales", "biases", "bias"):
        v = module.get(part)
        if not isinstance(v, mx.array):
            continue
        if part == "bias" and rule.kind == ROW:
            raise ShardingError("a bias on a sharded-to-all layer is not supported")
        new[part] = mx.contiguous(take_slice(v, rule, n, r, mx.concatenate))  # a bias [out] splits on axis 0
    module.update(new)


_REDUCED: Dict[type, type] = {}


def _sum_output(module: nn.Module, comm: Line) -> None:
    """Make `module` all-sum its output over `comm` (for groups that are not mx Groups).

    The module keeps its parameters and names; only its class becomes a subclass whose
    __call__ adds the sum.
    """
    cls = type(module)
    if cls not in _REDUCED:
        base_call = cls.__call__

        def __call__(self, *a, **k):
            return self._tp_comm.all_sum(base_call(self, *a, **k))

        _REDUCED[cls] = type(f"{cls.__name__}AllSum", (cls,), {"__call__": __call__})
    module.__class__ = _REDUCED[cls]
    module._tp_comm = comm


def model_table(model) -> Dict[str, TensorInfo]:
    return table_from_arrays(dict(tree_flatten(model.parameters())))


def shard_model(model, group=None):
    """Tensor parallelism over `group` (an mx.distributed Group, or a Line); see module doc."""
    group = group or mx.distributed.init()
    n, r = group.size(), group.rank()
    if n == 1:
        return model
    if getattr(model, "tensor_group", None) is not None:
        raise ShardingError("the model is already sharded")
    check_tensor_parallel(model.args, model_table(model), n)
    native = isinstance(group, mx.distributed.Group)

    def col(m):
        _slice_module(m, Rule(COL), n, r)

    def row_partial(m):  # sliced, no sum (the block sums once)
        _slice_module(m, Rule(ROW), n, r)

    def row_summed(parent, name):
        m = getattr(parent, name)
        if native:
            setattr(parent, name, shard_linear(m, ROW, group=group))
        else:
            _slice_module(m, Rule(ROW), n, r)
            _sum_output(m, group)

    for layer in model.layers:
        attn = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj"):
            col(getattr(attn, name))
        row_summed(attn, "o_proj")
        attn.n_heads //= n
        attn.n_kv_heads //= n
        if attn.is_sparse:
            col(attn.indexer.q_proj)
            attn.indexer.n_heads //= n
        mlp = layer.mlp
        if layer.is_moe:
            col(mlp.switch_mlp.gate_proj)
            col(mlp.switch_mlp.up_proj)
            row_partial(mlp.switch_mlp.down_proj)
            col(mlp.shared_experts.gate_proj)
            col(mlp.shared_experts.up_proj)
            row_partial(mlp.shared_experts.down_proj)
            if native:
                mlp.sharding_group = group
            else:
                _sum_output(mlp, group)
        else:
            col(mlp.gate_proj)
            col(mlp.up_proj)
            row_summed(mlp, "down_proj")
    model.tensor_group = group
    return model


# =============================================================================================
# Model.pipeline
# =============================================================================================
class PipelineStage:
    """The forward of one pipeline stage (called by TextModel.__call__)."""

    def __init__(self, stages: Stages, hidden_size: int):
        self.stages = stages
        self.hidden_size = hidden_size

    def __call__(self, text_model, inputs, cache=None, input_embeddings=None):
        st = self.stages
        dtype = text_model.norm.weight.dtype
        layers = text_model.layers
        if cache is None:
            cache = [None] * len(layers)
        if st.first:
            h = text_model.embed_tokens(inputs) if input_embeddings is None else input_embeddings
        else:
            shape = tuple(input_embeddings.shape) if input_embeddings is not None else (*inputs.shape, self.hidden_size)
            h = st.receive(shape, dtype)
        for layer, c in zip(layers, cache):
            h = layer(h, c)
        h = h.astype(dtype)
        if not st.last:
            h = st.send(h)
            if cache and cache[-1] is not None:
                # Evaluating the cache (as mlx-lm's prefill does) must also perform the send.
                cache[-1].keys = mx.depends(cache[-1].keys, h)
        h = st.gather_output(h)
        return text_model.norm(h)


def pipeline_model(model, group, split: Optional[Sequence[int]] = None):
    """Keep only this rank's stage of layers (see module doc). `group`: an mx Group or Stages."""
    stages = group if isinstance(group, Stages) else Stages(group, 1)
    P = stages.size()
    if P == 1:
        return model
    tm = model.language_model.model
    if getattr(tm, "pipeline_stage", None) is not None:
        raise ShardingError("the model is already split into pipeline stages")
    n = len(tm.layers)
    if split is None:
        check_pipeline(n, P)
        split = default_split(model.args, model_table(model), P)
    check_pipeline(n, P, split)
    start, end = stage_layers(split, stages.stage)
    tm.layers = tm.layers[start:end]
    tm.layer_offset = start
    tm.pipeline_split = tuple(split)
    if not stages.first and not model.args.tie_word_embeddings:
        tm.embed_tokens = None
    tm.pipeline_stage = PipelineStage(stages, model.args.hidden_size)
    return model


# =============================================================================================
# Loading only what a rank keeps
# =============================================================================================
_NP = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
       "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16,
       "U8": np.uint8, "F8_E4M3": np.uint8, "F8_E5M2": np.uint8, "BOOL": np.bool_}
_MX = {"F64": mx.float64, "F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16, "I64": mx.int64,
       "I32": mx.int32, "I16": mx.int16, "I8": mx.int8, "U64": mx.uint64, "U32": mx.uint32, "U16": mx.uint16,
       "U8": mx.uint8, "F8_E4M3": mx.uint8, "F8_E5M2": mx.uint8, "BOOL": mx.bool_}


@dataclass(frozen=True)
class StoredTensor:
    file: Path
    dtype: str
    shape: Tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


def checkpoint_tensors(path: Path) -> Dict[str, StoredTensor]:
    """Every tensor of a checkpoint folder from the safetensors headers (no data read)."""
    from ..weights.sanitize import CheckpointError, read_safetensors_header, weight_files

    out: Dict[str, StoredTensor] = {}
    for f in weight_files(path):
        header = read_safetensors_header(f)
        with open(f, "rb") as fh:
            base = 8 + int.from_bytes(fh.read(8), "little")
        for k, v in header.items():
            if k == "__metadata__":
                continue
            if k in out:
                raise CheckpointError(f"{f}: tensor {k} also found in {out[k].file.name}")
            if v["dtype"] not in _NP:
                raise CheckpointError(f"{f}: tensor {k} has unsupported dtype {v['dtype']}")
            lo, hi = v["data_offsets"]
            out[k] = StoredTensor(f, v["dtype"], tuple(v["shape"]), base + lo, hi - lo)
    return out


class _Reader:
    """Reads tensors or slices of them through one read-only memory map per file."""

    def __init__(self):
        self.maps: Dict[Path, np.memmap] = {}
        self.bytes_read = 0

    def read(self, t: StoredTensor, rule: Optional[Rule], n: int, r: int) -> mx.array:
        if t.file not in self.maps:
            self.maps[t.file] = np.memmap(t.file, dtype=np.uint8, mode="r")
        raw = self.maps[t.file][t.offset:t.offset + t.nbytes].view(_NP[t.dtype]).reshape(t.shape)
        part = np.ascontiguousarray(take_slice(raw, rule, n, r, lambda p, a: np.concatenate(p, axis=a)))
        self.bytes_read += part.nbytes
        arr = mx.array(part)
        if t.dtype == "BF16":
            arr = arr.view(mx.bfloat16)
        return arr

    def close(self):
        self.maps.clear()


def _source_block(config: dict, part: str, axis_is_last: bool) -> int:
    """Element block along a split axis that a source scale tensor covers (1: none)."""
    if part not in ("weight_scale_inv", "weight_scale"):
        return 1
    qc = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config") or {}
    block = qc.get("weight_block_size") or ([1, 32] if qc.get("quant_method") == "mxfp8" else [128, 128])
    return int(block[1] if axis_is_last else block[0])


def _check_source_slices(config, stored: Dict[str, StoredTensor], names, n: int) -> None:
    """Every tensor this rank slices splits exactly (raise before reading anything)."""
    for name in names:
        rule = tensor_rule(name)
        if rule is None or n == 1:
            continue
        t = stored[name]
        a = rule.axis(len(t.shape))
        if t.shape[a] % (n * rule.segments):
            raise ShardingError(f"tensor parallel over {n} ranks: {name} has {t.shape[a]} along axis {a}, "
                                f"which does not split into {n * rule.segments} equal parts")
        path, part = split_name(name)
        block = _source_block(config, part, a == len(t.shape) - 1)
        if block > 1:
            w = stored.get(f"{path}.weight")
            full = w.shape[a] if w is not None else t.shape[a] * block
            chunk = full // (n * rule.segments)
            if full != t.shape[a] * block or chunk % block:
                raise ShardingError(
                    f"tensor parallel over {n} ranks: {name} scales blocks of {block} along axis {a} and rank "
                    f"slices of {chunk} do not align with them; convert the checkpoint first "
                    f"(minimax-m3 convert) or use fewer ranks"
                )


@dataclass
class CheckpointInfo:
    config: dict
    args: Any
    stored: Dict[str, StoredTensor]  # the files' tensors (source names)
    table: Dict[str, TensorInfo]  # the model's tensors once loaded (final names)
    model: Any  # built, with the quantised structure the checkpoint needs; no weights


def inspect_checkpoint(path) -> CheckpointInfo:
    """What loading `path` gives, from config.json and the safetensors headers only.

    A dry run of the real load on lazy placeholders: the final names, shapes and dtypes
    (and, for MXFP8 sources, the quantised structure) exactly as the real load makes them.
    Nothing is allocated: the placeholders are never evaluated.
    """
    from ..weights.sanitize import VISION_PREFIXES, apply_mlx_quantization, check_weights, resolve_path
    from ..config import ModelArgs
    from ..model.model import Model

    path = resolve_path(path)
    config = json.loads((path / "config.json").read_text())
    args = ModelArgs.from_dict(config)
    stored = checkpoint_tensors(path)
    model = Model(args)
    # Distributed inference is text-only for now: the vision tensors (which the published
    # checkpoints hold) are left out, so sanitize builds no tower to be filled.
    text = {k: t for k, t in stored.items() if not k.startswith(VISION_PREFIXES)}
    dry = model.sanitize({k: mx.zeros(t.shape, _MX[t.dtype]) for k, t in text.items()})
    apply_mlx_quantization(model, config, dry)
    check_weights(model, dry)
    return CheckpointInfo(config, args, stored, table_from_arrays(dry), model)


@dataclass
class LoadStats:
    rank: int
    tensor: int
    pipeline: int
    layers: Tuple[int, int]
    bytes_read: int  # tensor bytes read from the checkpoint files
    param_bytes: int  # bytes of the loaded model's parameters
    expected: RankUsage  # what rank_usage predicted
    full_table: Dict[str, TensorInfo] = field(repr=False, default_factory=dict)
    seconds: float = 0.0


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


def load_sharded(path, group=None, mode: str = "tensor", tensor: Optional[int] = None,
                 split: Optional[Sequence[int]] = None):
    """Load this rank's part of a checkpoint folder (any layout checkpoint.load_model reads).

    mode: "tensor" (tensor parallel over all ranks), "pipeline" (one stage per rank) or
    "both" (`tensor` ranks per stage, default 2). Returns (model, config); the model's
    `load_stats` says what was read. All checks (heads, divisibility, layers per stage)
    run from the config and the safetensors headers before any tensor is read.
    """
    from ..weights.sanitize import DROPPED_PREFIXES, VISION_PREFIXES, CheckpointError, check_weights, resolve_path
    from ..model.model import Model

    t0 = time.perf_counter()
    group = group or mx.distributed.init()
    n, rank = group.size(), group.rank()
    T, P = plan_layout(n, mode, tensor)
    path = resolve_path(path)
    ck = inspect_checkpoint(path)
    config, args, stored, table, model = ck.config, ck.args, ck.stored, ck.table, ck.model
    check_tensor_parallel(args, table, T)
    check_pipeline(args.num_hidden_layers, P, split)
    split = list(split) if split is not None else default_split(args, table, P)
    usage = rank_usage(args, table, T, P, rank, split)

    # Which source tensors this rank needs, and its slice of each.
    start, end = usage.layers
    wanted = []
    for name in stored:
        if name.startswith(DROPPED_PREFIXES + VISION_PREFIXES):
            continue  # sanitize drops or sets these aside: never read them
        i = layer_of(name)
        if i is not None and not (start <= i < end):
            continue
        if i is None and is_embedding(name) and not usage.embed:
            continue
        wanted.append(name)
    t_rank = rank % T
    _check_source_slices(config, stored, wanted, T)
    # Layer by layer (a layer's tensors are self-contained for sanitize: experts stack
    # within it), evaluated as we go: the peak is what is kept plus one layer's slices.
    by_layer: Dict[int, List[str]] = {}
    for name in wanted:
        i = layer_of(name)
        by_layer.setdefault(-1 if i is None else i, []).append(name)
    reader = _Reader()
    host = Model(args)  # a throwaway model for sanitize, which may quantise its layers
    weights = {}
    for i in sorted(by_layer):
        raw = {k: reader.read(stored[k], tensor_rule(k) if T > 1 else None, T, t_rank) for k in by_layer[i]}
        part = host.sanitize(raw)
        del raw
        mx.eval(list(part.values()))
        weights.update(part)
    reader.close()
    del host

    tensor_group, stages = make_groups(group, T)
    if stages is not None:
        pipeline_model(model, stages, split)
    if tensor_group is not None:
        shard_model(model, tensor_group)
    if stages is not None and start:
        weights = {_renumber(k, -start): v for k, v in weights.items()}
    check_weights(model, weights)
    model.load_weights(list(weights.items()), strict=True)
    del weights
    mx.eval(model.parameters())
    model.eval()
    param_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    if param_bytes != usage.weight_bytes:
        raise CheckpointError(
            f"rank {rank}: loaded {param_bytes} parameter bytes, the plan says {usage.weight_bytes}"
        )
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))  # everyone is ready
    model.load_stats = LoadStats(rank, T, P, usage.layers, reader.bytes_read, param_bytes, usage, table,
                                 time.perf_counter() - t0)
    return model, config


def _renumber(name: str, delta: int) -> str:
    m = _LAYER.search(name)
    return name[:m.start(1)] + str(int(m.group(1)) + delta) + name[m.end(1):] if m else name


def load(path, group=None, mode: str = "tensor", tensor: Optional[int] = None,
         tokenizer_config: Optional[dict] = None):
    """(model, tokenizer) for this rank, like checkpoint.load but sharded (see load_sharded)."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from ..weights.sanitize import resolve_path

    model, config = load_sharded(path, group, mode, tensor)
    path = resolve_path(path)
    eos = config.get("eos_token_id", (config.get("text_config") or {}).get("eos_token_id"))
    eos = [eos] if isinstance(eos, int) else eos
    return model, load_tokenizer(path, tokenizer_config or {}, eos_token_ids=eos)
