"""Loading with --expert-memory: the routed experts stay in the folder's files, a budget of them in memory.

The model's own `stream_experts` builds the slot pools (model/experts.py); here the
budget is settled (`auto`: what the machine has left after the other weights, the KV
cache of a context and a margin) and the experts' tensors are taken out of what is loaded.

Under mlx.launch the budget is each rank's own (its Mac's memory) and each rank streams
only what it holds (its stage's layers, its slice of every expert): `check_ranks` settles
it from the headers on every rank before any rank reads a weight or meets the others.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Union

import mlx.core as mx
from mlx.utils import tree_flatten

from ..io.reader import StoredTensor, locate
from ..model import Model
from ..config import ModelArgs
from ..model.experts import (EXPERTS, ExpertMemoryError, fused_parts, gigabytes, layer_parts, layer_tensors,
                              slots_for)
from ..parallel.sizing import RankUsage, cache_bytes
from ..weights.sanitize import rename

AUTO = "auto"
AUTO_CONTEXT = 32768  # tokens of KV cache that `auto` leaves room for
MARGIN = 0.10  # of the machine's memory, left free by `auto`


def machine_memory() -> int:
    """Bytes the backend may use: Metal's recommended working set on a Mac, else the RAM."""
    info = mx.device_info()
    if "max_recommended_working_set_size" in info:
        return int(info["max_recommended_working_set_size"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class EveryRankError(ExpertMemoryError):
    """A refusal that every rank under mlx.launch raises alike, before any collective: the
    command's line comes from rank 0 alone (cli._run)."""

    every_rank = True


def auto_expert_memory(args: ModelArgs, resident_bytes: int, context: int = AUTO_CONTEXT,
                       memory: Optional[int] = None, tensor: int = 1, layers=None) -> int:
    """What `--expert-memory auto` gives the experts: memory - margin - other weights - KV cache
    (of the rank's heads and layers under mlx.launch: `tensor`, `layers` as cache_bytes takes them)."""
    memory = machine_memory() if memory is None else memory
    kv, idx = cache_bytes(args, context, tensor, layers)
    left = int(memory * (1 - MARGIN)) - resident_bytes - kv - idx
    if left <= 0:
        raise ExpertMemoryError(
            f"--expert-memory auto: nothing is left for experts ({gigabytes(memory)} of memory, "
            f"{gigabytes(resident_bytes)} of other weights, {gigabytes(kv + idx)} of KV cache for "
            f"{context} tokens, {MARGIN:.0%} margin)")
    return left


def settle(args: ModelArgs, expert_memory: Union[int, str], resident_bytes: int) -> int:
    """The budget in bytes: `expert_memory` itself, or what `auto` leaves."""
    if expert_memory == AUTO:
        return auto_expert_memory(args, resident_bytes)
    if isinstance(expert_memory, str) or expert_memory <= 0:
        raise ExpertMemoryError(f"--expert-memory must be a positive size or {AUTO!r}, got {expert_memory!r}")
    return expert_memory


def stored_tensors(path: Path) -> Dict[str, StoredTensor]:
    """Where each tensor of the folder is, in this package's names: a folder mlx-lm's converter
    wrote stacks its experts as ours are, under other names (`block_sparse_moe.switch_mlp`)."""
    return {rename(k): t for k, t in locate(path).items()}


def check_expert_memory(path: Path, args: ModelArgs, expert_memory: Union[int, str]) -> None:
    """What `stream_experts` would refuse, found from the headers alone (the server checks
    before it listens; its weights load in a thread where a failure could only be logged)."""
    stored = stored_tensors(path)
    resident = sum(t.nbytes for k, t in stored.items() if EXPERTS not in k)
    layers = [layer_tensors(stored, i) for i in range(args.num_hidden_layers) if args.is_moe(i)]
    slots_for(settle(args, expert_memory, resident), layers, args.num_experts_per_tok, layer_parts(layers[0], 1, 0))


def stream_experts(model: Model, path: Path, weights: Dict[str, mx.array],
                   expert_memory: Union[int, str]) -> Dict[str, mx.array]:
    """Give `model` its expert pools; returns the weights to load (the experts' replaced by the pools')."""
    rest = {k: v for k, v in weights.items() if EXPERTS not in k}
    stored = {k: t for k, t in stored_tensors(path).items() if EXPERTS in k}
    model.stream_experts(stored, settle(model.args, expert_memory, sum(v.nbytes for v in rest.values())))
    rest.update((k, v) for k, v in tree_flatten(model.parameters()) if EXPERTS in k)
    return rest


def rank_budget(args: ModelArgs, stored, usage: RankUsage, tensor: int,
                expert_memory: Union[int, str]) -> Optional[int]:
    """The expert bytes of rank `usage.rank` (None: its stage has no routed experts), checked
    from the headers against the slots it must hold.

    Its budget is its own: `auto` counts its own other weights (and the KV cache of its
    layers and heads), and a slot holds its part of an expert (`layer_parts`), so the
    minimum is its own. Ranks may end up with different slot counts: every rank routes
    every token alike (the router is whole on each), so each computes its share exactly
    whatever it holds; a slot count shared by all would waste a larger Mac's memory.
    """
    start, end = usage.layers
    layers = [layer_tensors(stored, i) for i in range(start, end) if args.is_moe(i)]
    if not layers:
        return None
    if fused_parts(layers[0]):  # the shared expert lives inside the fused tensors the ranks would skip
        raise ExpertMemoryError("--expert-memory runs on one Mac for a folder whose gate and up are fused "
                                "(mlx-vlm's converter); under mlx.launch, convert it with `minimax-m3 convert`")
    resident = usage.weight_bytes - usage.expert_bytes
    try:
        if expert_memory == AUTO:
            budget = auto_expert_memory(args, resident, tensor=tensor, layers=usage.layers)
        else:
            budget = settle(args, expert_memory, resident)
        slots_for(budget, layers, args.num_experts_per_tok, layer_parts(layers[0], tensor, usage.tensor_rank))
    except ExpertMemoryError as e:
        raise ExpertMemoryError(f"rank {usage.rank}: {e}") from None
    return budget


def check_ranks(args, stored, usages: List[RankUsage], rank: int, tensor: int,
                expert_memory: Union[int, str]) -> Optional[int]:
    """This rank's expert bytes (`rank_budget`), after checking every rank's budget where it
    can be known here (a size: every rank, so that all refuse alike, before any collective,
    and none waits on a peer that stopped; `auto` depends on each Mac's memory: this rank only)."""
    if expert_memory == AUTO:
        return rank_budget(args, stored, usages[rank], tensor, expert_memory)
    try:
        return [rank_budget(args, stored, u, tensor, expert_memory) for u in usages][rank]  # in rank order
    except ExpertMemoryError as e:
        raise EveryRankError(str(e)) from None
