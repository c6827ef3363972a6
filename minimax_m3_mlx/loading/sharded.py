"""Loading one rank's part of a checkpoint for tensor, pipeline or both kinds of parallelism.

Every rank reads only what it keeps: the tensors of its layers, and of those only its
slice (its heads, its part of every expert's intermediate dimension), from the safetensors
files by offset (io.reader.TensorReader). Per-rank resident weight bytes are the replicated
tensors plus 1/N of the sharded ones (tensor parallel) or the rank's layers (pipeline),
exactly what parallel.sizing.rank_usage (and so `minimax-m3 plan`) predicts: the loader
checks that. How the model splits: Model.shard / Model.pipeline; which tensor splits how:
weights/sharding.py; modes and groups: docs/distributed.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..io import CheckpointError
from ..io.reader import StoredTensor, TensorReader, locate, placeholder
from ..model.collectives import make_groups
from ..parallel.sizing import RankUsage, plan_layout, rank_usage
from ..weights.quant import quant_block
from ..weights.sanitize import DROPPED_PREFIXES, rename, sanitize, vision_tensors
from ..weights.sharding import (
    ShardingError, TensorInfo, check_pipeline, check_tensor_parallel, default_split, is_embedding, layer_of,
    renumber_layer, split_name, table_from_arrays, take_slice, tensor_rule,
)
from ..weights.vision_names import VISION_PREFIXES
from ..model.experts import EXPERTS
from .checkpoint import check_weights, prepare_model, read_config, resolve_path
from .streamed import check_ranks


def _source_block(config: dict, part: str, axis_is_last: bool) -> int:
    """Element block along a split axis that a source scale tensor covers (1: none)."""
    if part not in ("weight_scale_inv", "weight_scale"):
        return 1
    qc = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config") or {}
    rows, cols = quant_block(qc)
    return cols if axis_is_last else rows


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

    A dry run of the real load (checkpoint.prepare_model) on lazy placeholders: the final
    names, shapes and dtypes (and, for MXFP8 sources, the quantised structure) exactly as
    the real load makes them. Nothing is allocated: the placeholders are never evaluated.
    The model has the vision tower where the checkpoint holds one (structure only); the
    table holds the text tensors, which the parallel layouts split.
    """
    path = resolve_path(path)
    config, args = read_config(path)
    stored = locate(path)
    model, dry = prepare_model(config, args, {k: placeholder(t) for k, t in stored.items()})
    text = {k: v for k, v in dry.items() if not k.startswith(VISION_PREFIXES)}
    return CheckpointInfo(config, model.args, stored, table_from_arrays(text), model)


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
    vision_bytes: int = 0  # of the vision tower's parameters, on the ranks that hold it (_load_vision)
    expert_pool_bytes: int = 0  # --expert-memory: the slot pools' (param_bytes and bytes_read leave them out)


def _wanted(stored: Dict[str, StoredTensor], usage: RankUsage) -> Dict[int, List[str]]:
    """The source tensors this rank keeps, by layer (-1: outside the layers)."""
    start, end = usage.layers
    by_layer: Dict[int, List[str]] = {}
    for name in stored:
        if name.startswith(DROPPED_PREFIXES + VISION_PREFIXES):
            continue  # sanitize drops or sets these aside: never read them
        i = layer_of(name)
        if (i is not None and not start <= i < end) or (i is None and is_embedding(name) and not usage.embed):
            continue
        by_layer.setdefault(-1 if i is None else i, []).append(name)
    return by_layer


def _read_weights(args, stored, by_layer: Dict[int, List[str]], tensor: int, t_rank: int, reader: TensorReader):
    """This rank's slices of its tensors, in our names. Layer by layer (a layer's tensors are
    self-contained for sanitize: experts stack within it), evaluated as we go: the peak is
    what is kept plus one layer's slices."""
    def select(name):
        rule = tensor_rule(name) if tensor > 1 else None
        return lambda a: take_slice(a, rule, tensor, t_rank, lambda parts, axis: np.concatenate(parts, axis=axis))

    weights = {}
    for i in sorted(by_layer):
        raw = {k: reader.read(stored[k], select(k)) for k in by_layer[i]}
        part, _ = sanitize(args, raw, vision=False)
        del raw
        mx.eval(list(part.values()))
        weights.update(part)
    return weights


def _load_vision(model, tower: Optional[Dict[str, Any]], args, stored, keep: bool) -> int:
    """Put the vision tower back on a rank that embeds tokens, loaded whole; returns its bytes.

    The tower is replicated rather than split, on every rank that holds the token embedding
    (every rank in tensor mode, the first stage's in pipeline mode): it is small next to the
    text model (about 0.6B parameters against 428B), and each of these ranks then computes the
    same image rows with no communication at all. A later pipeline stage only receives hidden
    states; for an image prompt it needs the prompt's length alone (vision.get_input_embeddings).
    """
    if tower is None:
        return 0
    if not keep:
        model.vision_elsewhere = True
        return 0
    reader = TensorReader()
    weights = vision_tensors(args, {k: reader.read(t) for k, t in stored.items() if k.startswith(VISION_PREFIXES)})
    reader.close()
    vision = nn.Module()
    for name, module in tower.items():
        setattr(vision, name, module)
    check_weights(vision, weights)
    vision.load_weights(list(weights.items()), strict=True)
    mx.eval(vision.parameters())
    for name, module in tower.items():
        setattr(model, name, module)
    return sum(v.nbytes for _, v in tree_flatten(vision.parameters()))


def _layout(ck: CheckpointInfo, n: int, mode: str, tensor: Optional[int], split):
    """(tensor size, pipeline size, layers per stage), checked against the model."""
    T, P = plan_layout(n, mode, tensor)
    check_tensor_parallel(ck.args, ck.table, T)
    check_pipeline(ck.args.num_hidden_layers, P, split)
    return T, P, list(split) if split is not None else default_split(ck.args, ck.table, P)


def _expert_budget(ck: CheckpointInfo, n, rank, T, P, split, expert_memory) -> Optional[int]:
    """This rank's --expert-memory bytes, every rank's checked (streamed.check_ranks); None: not streamed."""
    if expert_memory is None:
        return None
    usages = [rank_usage(ck.args, ck.table, T, P, r, split) for r in range(n)]
    return check_ranks(ck.args, {rename(k): t for k, t in ck.stored.items()}, usages, rank, T, expert_memory)


def check_experts(path, group, mode: str = "tensor", tensor: Optional[int] = None,
                  split: Optional[Sequence[int]] = None, expert_memory=None) -> None:
    """What load_sharded(..., expert_memory=) would refuse on this rank, from the headers
    alone (the server checks before it listens)."""
    ck = inspect_checkpoint(path)
    T, P, split = _layout(ck, group.size(), mode, tensor, split)
    _expert_budget(ck, group.size(), group.rank(), T, P, split, expert_memory)


def load_sharded(path, group=None, mode: str = "tensor", tensor: Optional[int] = None,
                 split: Optional[Sequence[int]] = None, expert_memory: Optional[Union[int, str]] = None):
    """Load this rank's part of a checkpoint folder (any layout checkpoint.load_model reads).

    mode: "tensor" (tensor parallel over all ranks), "pipeline" (one stage per rank) or
    "both" (`tensor` ranks per stage, default 2). Returns (model, config); the model's
    `load_stats` says what was read. All checks (heads, divisibility, layers per stage,
    every rank's expert budget) run from the config and the safetensors headers before any
    tensor is read.

    expert_memory: this rank's bytes (or "auto") of routed experts in memory (streamed.py);
    its experts are not read now but streamed: its stage's, its slice of each.
    """
    t0 = time.perf_counter()
    group = group or mx.distributed.init()
    n, rank = group.size(), group.rank()
    ck = inspect_checkpoint(path)
    config, args, stored, table, model = ck.config, ck.args, ck.stored, ck.table, ck.model
    # The tower is set aside while the text model is split and loaded (_load_vision).
    tower = {name: model.pop(name) for name in ("vision_tower", "multi_modal_projector")} if model.has_vision else None
    T, P, split = _layout(ck, n, mode, tensor, split)
    usage = rank_usage(args, table, T, P, rank, split)
    by_layer = _wanted(stored, usage)
    budget = _expert_budget(ck, n, rank, T, P, split, expert_memory)
    if budget is not None:
        by_layer = {i: [k for k in names if EXPERTS not in rename(k)] for i, names in by_layer.items()}
    _check_source_slices(config, stored, [k for names in by_layer.values() for k in names], T)
    reader = TensorReader()
    weights = _read_weights(args, stored, by_layer, T, rank % T, reader)
    reader.close()

    tensor_group, stages = make_groups(group, T)
    if stages is not None:
        model.pipeline(stages, split)
    if tensor_group is not None:
        model.shard(tensor_group)
    start = usage.layers[0]
    if stages is not None and start:
        weights = {renumber_layer(k, -start): v for k, v in weights.items()}
    if budget is not None:
        model.stream_experts({rename(k): t for k, t in stored.items() if EXPERTS in rename(k)}, budget)
        weights.update((k, v) for k, v in tree_flatten(model.parameters()) if EXPERTS in k)
    check_weights(model, weights)
    model.load_weights(list(weights.items()), strict=True)
    del weights
    mx.eval(model.parameters())
    model.eval()
    params = dict(tree_flatten(model.parameters()))
    pools = sum(v.nbytes for k, v in params.items() if EXPERTS in k) if budget is not None else 0
    param_bytes = sum(v.nbytes for v in params.values()) - pools
    expected = usage.weight_bytes - (usage.expert_bytes if budget is not None else 0)  # streamed: not loaded
    if param_bytes != expected:
        raise CheckpointError(f"rank {rank}: loaded {param_bytes} parameter bytes, the plan says {expected}")
    vision_bytes = _load_vision(model, tower, args, stored, usage.embed)
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))  # everyone is ready
    model.load_stats = LoadStats(rank, T, P, usage.layers, reader.bytes_read, param_bytes, usage, table,
                                 time.perf_counter() - t0, vision_bytes, pools)
    return model, config
