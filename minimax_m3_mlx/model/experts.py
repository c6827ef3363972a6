"""Routed experts streamed from the checkpoint's files into a per-layer pool of slots (--expert-memory).

Each MoE layer keeps `n_slots` experts in memory: the same quantised tensors as its
SwitchGLU, with `n_slots` rows instead of one per expert. The router's choices are looked
up in the layer's slot table; experts that are not resident are read from the folder's
safetensors by byte range (io.reader.RangeReader: an expert is row e of each stacked
tensor) into the slots the least recently used experts held, and the gather matmul runs
over the pool with the choices renumbered to slots. Every pair (token, choice) meets the
same weights as in the resident model, so the logits are the same.

A step that needs more experts than there are slots (a prefill chunk, a wide batch) runs
in rounds of at most `n_slots` experts, each round computing only the pairs routed to its
experts; the next round's reads are in flight while a round computes.

Reads overlap compute in two more ways: consecutive experts are read as one range per
tensor, and while a layer computes, the reads of the experts that the next MoE layer's
router picks for this layer's input are in flight (a guess: the next layer's true input
differs by one attention block, so a wrong guess costs only bandwidth; what is read is
used only when the true routing asks for that expert).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..io.dtypes import DTYPES
from ..io.reader import RangeReader, RowSlice, StoredTensor, part_nbytes, read_nbytes, to_mx
from ..weights.sharding import chunk_bounds, tensor_rule

# The switch_mlp tensors are what the pool holds; the rest of each MoE block stays resident.
EXPERTS = ".mlp.switch_mlp."
READ_THREADS = 8


class ExpertMemoryError(ValueError):
    """An --expert-memory request that cannot be served: the message names what is needed."""


@dataclass
class ExpertStats:
    """Counters over every streamed layer since the last reset (hits and misses count experts)."""

    hits: int = 0
    misses: int = 0
    prefetched: int = 0  # misses whose read a guess or an earlier round had already started
    bytes_read: int = 0
    guessed_unused: int = 0  # experts read on a guess that the routing did not ask for
    rounds: int = 0  # layer calls that needed more experts than there are slots, in extra rounds

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, 0)

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0


class ExpertStreamer:
    """Shared by a model's streamed layers: the reader, its threads, the counters, the layer order."""

    def __init__(self, threads: int = READ_THREADS, prefetch: bool = True):
        self.reader = RangeReader()
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix="expert-read")
        self.stats = ExpertStats()
        self.layers: List["LayerExperts"] = []
        self.prefetch = prefetch

    def next_after(self, layer: "LayerExperts") -> Optional["LayerExperts"]:
        i = self.layers.index(layer)
        return self.layers[i + 1] if i + 1 < len(self.layers) else None

    @property
    def n_slots(self) -> int:
        return self.layers[0].n_slots if self.layers else 0

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.reader.close()


def runs(experts: np.ndarray) -> List[Tuple[int, int]]:
    """Sorted expert ids as [a, b) ranges of consecutive ids: one read per range and tensor."""
    if experts.size == 0:
        return []
    cuts = np.nonzero(np.diff(experts) != 1)[0] + 1
    return [(int(g[0]), int(g[-1]) + 1) for g in np.split(experts, cuts)]


class LayerExperts:
    """One MoE layer's slot table, its staged reads and its pool's updates.

    `tensors` maps the switch_mlp's parameter names ("gate_proj.weight", ...) to the stored
    stacked tensors [n_experts, ...]; `router` is the layer's own router (for guesses made
    by the layer before it); `parts` (tensor parallel: `rank_parts`) the part of each
    expert's row of a tensor that this process holds, whole where absent.
    """

    def __init__(self, streamer: ExpertStreamer, tensors: Dict[str, StoredTensor], n_slots: int, router,
                 parts: Optional[Dict[str, RowSlice]] = None):
        self.streamer = streamer
        self.tensors = tensors
        self.parts = parts or {}
        self.router = router
        self.n_slots = n_slots
        n_experts = next(iter(tensors.values())).shape[0]
        self.slot_of = np.full(n_experts, -1, np.int64)
        self.expert_in = np.full(n_slots, -1, np.int64)
        self.used_at = np.full(n_slots, -1, np.int64)  # empty slots (-1) are taken first
        self.clock = 0
        self.staged: Dict[int, Tuple[Future, int]] = {}  # expert -> (read of its run, row in the run)

    @property
    def expert_nbytes(self) -> int:
        """Bytes of one slot (this process's part of one expert)."""
        return sum(part_nbytes(t, self.parts.get(k)) for k, t in self.tensors.items())

    @property
    def read_nbytes(self) -> int:
        """Bytes read for one missed expert (io.reader.read_nbytes: whole rows where a part is strided)."""
        return sum(read_nbytes(t, self.parts.get(k)) for k, t in self.tensors.items())

    def empty_pool(self) -> Dict[str, mx.array]:
        """The pool's tensors, zero until experts are read into them."""
        return {k: mx.zeros((self.n_slots, *self._row_shape(k)), DTYPES[t.tag].mlx) for k, t in self.tensors.items()}

    def _row_shape(self, k: str) -> Tuple[int, ...]:
        part = self.parts.get(k)
        return self.tensors[k].shape[1:] if part is None else part.shape(self.tensors[k].shape[1:])

    # -- reads ------------------------------------------------------------------------------------------
    def _read_run(self, a: int, b: int) -> Dict[str, np.ndarray]:
        reader = self.streamer.reader
        return {k: reader.read_rows(t, (a, b), self.parts.get(k)) for k, t in self.tensors.items()}

    def stage(self, experts: np.ndarray) -> None:
        """Start reading the experts that are neither resident nor already on their way."""
        experts = np.asarray(experts, np.int64)
        todo = experts[(self.slot_of[experts] < 0) & ~np.isin(experts, list(self.staged))]
        for a, b in runs(np.unique(todo)):
            fut = self.streamer.executor.submit(self._read_run, a, b)
            for e in range(a, b):
                self.staged[e] = (fut, e - a)

    def drop_staged(self) -> None:
        """Forget reads nobody asked for (wrong guesses): they cost bandwidth only."""
        for fut, _ in self.staged.values():
            fut.cancel()
        self.streamer.stats.guessed_unused += len(self.staged)
        self.staged.clear()

    # -- residency ------------------------------------------------------------------------------------
    def ensure(self, mlp, needed: np.ndarray) -> None:
        """Make the experts `needed` (sorted, unique, at most n_slots) resident in `mlp`'s pool.

        The slot tables change only after every read succeeded: a read that fails (a file
        deleted or truncated since loading) leaves the pool as it was, so it can never
        hand out another expert's weights."""
        stats = self.streamer.stats
        self.clock += 1
        resident = self.slot_of[needed] >= 0
        hits, misses = needed[resident], needed[~resident]
        self.used_at[self.slot_of[hits]] = self.clock
        stats.hits += int(hits.size)
        stats.misses += int(misses.size)
        if misses.size == 0:
            return
        self.stage(misses)
        parts = [self.staged.pop(int(e)) for e in misses]
        rows = {k: np.stack([fut.result()[k][i] for fut, i in parts]) for k in self.tensors}
        stats.bytes_read += int(misses.size) * self.read_nbytes

        free = np.ones(self.n_slots, bool)
        free[self.slot_of[hits]] = False
        candidates = np.nonzero(free)[0]
        victims = candidates[np.argsort(self.used_at[candidates], kind="stable")[: misses.size]]
        old = self.expert_in[victims]
        self.slot_of[old[old >= 0]] = -1
        self.expert_in[victims] = misses
        self.slot_of[misses] = victims
        self.used_at[victims] = self.clock

        where = mx.array(victims.astype(np.uint32))
        params = dict(tree_flatten(mlp.parameters()))
        for k, t in self.tensors.items():
            params[k][where] = to_mx(t, rows[k])  # in place: the pool is the array's only holder
        mx.eval([params[k] for k in self.tensors])

    # -- the layer's routed experts -----------------------------------------------------------------------
    def __call__(self, mlp, x: mx.array, inds: mx.array) -> mx.array:
        """What mlp(x, inds) computes over all the layer's experts, over the slot pool: [..., k, D]."""
        nxt = self.streamer.next_after(self) if self.streamer.prefetch else None
        guess = nxt.router(x)[0] if nxt is not None else None
        mx.eval(inds if guess is None else [inds, guess])
        ids = np.array(inds).reshape(-1).astype(np.int64)
        needed = np.unique(ids)
        rounds = [needed[i:i + self.n_slots] for i in range(0, needed.size, self.n_slots)]
        early = np.isin(needed, list(self.staged)) & (self.slot_of[needed] < 0)
        self.streamer.stats.prefetched += int(early.sum())
        self.stage(rounds[0])
        if guess is not None:
            nxt.stage(np.unique(np.array(guess))[: nxt.n_slots])
        try:
            if len(rounds) == 1:
                self.ensure(mlp, rounds[0])
                return mlp(x, mx.array(self.slot_of[ids].reshape(inds.shape).astype(np.uint32)))
            return self._in_rounds(mlp, x, inds, ids, rounds)
        except BaseException:
            for layer in self.streamer.layers:  # reads begun for this step die with it
                layer.drop_staged()
            raise
        finally:
            self.drop_staged()

    def _in_rounds(self, mlp, x, inds, ids, rounds) -> mx.array:
        self.streamer.stats.rounds += len(rounds) - 1
        k, D = inds.shape[-1], x.shape[-1]
        flat = x.reshape(-1, D)
        outs, order = [], []
        for r, group in enumerate(rounds):
            self.ensure(mlp, group)
            if r + 1 < len(rounds):
                self.stage(rounds[r + 1])  # read while this round computes
            pairs = np.nonzero(np.isin(ids, group))[0]
            slots = mx.array(self.slot_of[ids[pairs]].astype(np.uint32))[:, None]
            y = mlp(flat[mx.array(pairs // k)], slots)[:, 0]
            mx.eval(y)  # before the next round overwrites the slots it reads
            outs.append(y)
            order.append(pairs)
        back = mx.array(np.argsort(np.concatenate(order)))
        return mx.concatenate(outs)[back].reshape(*inds.shape, D)


def layer_tensors(tensors: Dict[str, StoredTensor], layer: int) -> Dict[str, StoredTensor]:
    """The stored switch_mlp tensors of decoder layer `layer`, by their names inside the SwitchGLU."""
    prefix = f"language_model.model.layers.{layer}{EXPERTS}"
    out = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}
    if not out:
        raise ExpertMemoryError(
            f"--expert-memory needs the experts stacked per layer as `minimax-m3 convert` writes them; "
            f"this folder has no {prefix}* tensors")
    return out


def rank_parts(tensors: Dict[str, StoredTensor], n: int, rank: int) -> Dict[str, RowSlice]:
    """The part of each expert's row of a layer's switch_mlp tensors (`layer_tensors`) that
    rank `rank` of `n` holds under tensor parallelism: the slices SparseMoeBlock.shard keeps
    (gate/up: rows of the intermediate dimension; down: its last axis), by the loader's rules."""
    out = {}
    for k, t in tensors.items():
        rule = tensor_rule(EXPERTS + k) if n > 1 else None
        if rule is None:
            continue
        if rule.segments != 1:
            raise ExpertMemoryError(f"--expert-memory does not run tensor parallel over fused expert "
                                    f"tensors ({k}); convert the folder with `minimax-m3 convert`")
        axis = rule.axis(len(t.shape))
        (lo, hi), = chunk_bounds(t.shape[axis], 1, n, rank)
        out[k] = RowSlice(axis - 1, lo, hi)
    return out


def gigabytes(n: int) -> str:
    return f"{n / 1e9:.3g} GB" if n >= 1e8 else f"{n / 1e6:.3g} MB" if n >= 1e5 else f"{n} bytes"


def slots_for(expert_memory: int, layers: List[Dict[str, StoredTensor]], top_k: int,
              parts: Optional[Dict[str, RowSlice]] = None) -> int:
    """Slots per layer that `expert_memory` bytes buy (at most every expert); a budget below
    one token's top-k experts in every layer is refused, naming the minimum. `parts`
    (`rank_parts`): a tensor-parallel rank's slots hold only its part of each expert."""
    parts = parts or {}
    per_slot = sum(sum(part_nbytes(t, parts.get(k)) for k, t in ts.items()) for ts in layers)  # one slot per layer
    n_experts = next(iter(layers[0].values())).shape[0]
    least = top_k * per_slot
    if expert_memory < least:
        raise ExpertMemoryError(
            f"--expert-memory {gigabytes(expert_memory)} is below the minimum of {gigabytes(least)} "
            f"(the {top_k} experts one token uses in each of {len(layers)} MoE layers)")
    return min(n_experts, expert_memory // per_slot)
