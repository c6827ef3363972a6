"""How tensors split across ranks: tensor-parallel rules by tensor name, and pipeline stages.

Tensor parallel: query, KV and index heads are split by KV group (rank r owns KV heads
[r*Hkv/N, (r+1)*Hkv/N), the query heads of those groups and the index heads that serve
them), routed experts, the shared expert and dense MLPs along the intermediate dimension.
The rules below say, for any checkpoint spelling of a tensor name, which axis is split;
the per-rank loader slices source tensors with them, the memory plan sizes with them, and
`check_tensor_parallel` validates a rank count against them before anything changes.
The model's own modules shard themselves the same way (model/model.py: `Model.shard`).

Pipeline: layers are split into contiguous stages balanced by weight bytes (the embedding
counted on the stage that runs layer 0). As in mlx-lm's PipelineMixin the last stage runs
the first layers and stage 0 (rank 0) the last ones.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np


class ShardingError(ValueError):
    """A rank count or layout the model cannot be split into (raised before anything changes)."""

# -- which tensors are split, and how --------------------------------------------------------

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
    # fused: per segment (mlx-vlm's switch_mlp also holds the shared expert as expert E)
    (re.compile(r"\.(experts|shared_experts|mlp|switch_mlp)\.gate_up_proj$"), COL, 2),
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


# -- validation (before anything is modified) ------------------------------------------------
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


def default_split(args, table: Dict[str, TensorInfo], pipeline: int) -> List[int]:
    if pipeline == 1:
        return [args.num_hidden_layers]
    embed = 0 if args.tie_word_embeddings else sum(i.nbytes for k, i in table.items() if is_embedding(k))
    return balanced_split(layer_bytes(table, args.num_hidden_layers), pipeline, embed)


def renumber_layer(name: str, delta: int) -> str:
    """`name` with its layer number moved by `delta` (a pipeline stage numbers its layers from 0)."""
    m = _LAYER.search(name)
    return name[:m.start(1)] + str(int(m.group(1)) + delta) + name[m.end(1):] if m else name
