"""Routed experts streamed from the checkpoint's files into a per-layer pool of slots (--expert-memory).

Each MoE layer keeps `n_slots` experts in memory: the same quantised tensors as its
SwitchGLU, with `n_slots` rows instead of one per expert. The router's choices are looked
up in the layer's slot table; experts that are not resident are read from the folder's
safetensors by byte range (io.reader.RangeReader: an expert is row e of each stacked
tensor) into the slots of experts the policy lets go (POLICY, below), and the gather
matmul runs over the pool with the choices renumbered to slots. Every pair (token, choice) meets the
same weights as in the resident model, so the logits are the same.

Where the backend lets the CPU write an evaluated array in place (Metal's unified memory,
MLX's CPU: `writes_in_place`), a miss is read straight into its slot's memory
(DirectLayerExperts): the disk's bytes land in the pool with no buffer and no copy, so
the process holds the pools and nothing more. Elsewhere misses go through buffers
(expert_copies.CopyingLayerExperts).

A step that needs more experts than there are slots (a prefill chunk, a wide batch) runs
in rounds, each computing only the pairs routed to its experts, the next round's reads in
flight while a round computes. While a layer computes, the reads of the experts that the
next MoE layer's router picks for this layer's input are in flight too (a guess: the next
layer's true input differs by one attention block, so a wrong guess costs bandwidth and,
on the direct path, the least recently used slot; never a wrong weight).
"""

from __future__ import annotations

import ctypes
from abc import ABC, abstractmethod
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..io.dtypes import DTYPES
from ..io.reader import RangeReader, RowSlice, StoredTensor, part_nbytes, part_span, read_nbytes
from ..weights.sharding import chunk_bounds, tensor_rule

# The switch_mlp tensors are what the pool holds; the rest of each MoE block stays resident.
EXPERTS = ".mlp.switch_mlp."
READ_THREADS = 8
# Which resident expert a miss replaces. lru: the least recently used. lrfu: the one used
# least often lately (a count per expert that halves every HALF_LIFE calls of the layer),
# the least recently used among equals. lrfu is the default: on skewed routing traces it
# hits more than LRU at small budgets and on uniform ones it hits as often
# (scripts/expert_policies.py replays traces through both; BENCHMARKS.md has the figures).
# `plan --hit-curve` reads the curve of POLICY.
POLICIES = ("lru", "lrfu")
POLICY = "lrfu"
HALF_LIFE = 16
# Bytes per read: an expert's rows (3 x 9.4 MB and 6 x 0.6 MB at 4 bits) are split so that
# one miss keeps several reads in flight, as an SSD needs to reach its speed.
PIECE = 4 << 20
# Reads started ahead of need (guesses, later rounds) hold buffers outside the pool: at most
# this share of the pool's bytes, so that the process stays within --expert-memory's bound.
READ_AHEAD_SHARE = 0.05


class ExpertMemoryError(ValueError):
    """An --expert-memory request that cannot be served: the message names what is needed."""


@dataclass
class ExpertStats:
    """Counters over every streamed layer since the last reset (hits and misses count experts)."""

    hits: int = 0
    misses: int = 0
    prefetched: int = 0  # misses whose read a guess or an earlier round had already started
    reads: int = 0  # experts read from the files (guesses included)
    bytes_read: int = 0
    guessed_unused: int = 0  # experts read on a guess that the step's routing did not ask for
    rounds: int = 0  # layer calls that needed more experts than there are slots, in extra rounds
    peak_staged_bytes: int = 0  # the most bytes of read buffers outside the pools at once

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, 0)

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0


class ExpertStreamer:
    """Shared by a model's streamed layers: the reader, its threads, the counters, the layer order."""

    def __init__(self, threads: Optional[int] = None, prefetch: bool = True, policy: str = POLICY):
        if policy not in POLICIES:
            raise ExpertMemoryError(f"expert policy {policy!r}: choose from {', '.join(POLICIES)}")
        self.policy = policy
        self.reader = RangeReader()
        self.executor = ThreadPoolExecutor(threads or READ_THREADS, thread_name_prefix="expert-read")
        self.stats = ExpertStats()
        self.layers: List["LayerExperts"] = []
        self.prefetch = prefetch
        self.read_ahead = 0  # bytes of read buffers allowed in flight: set by stream_experts
        self.staged_bytes = 0

    def next_after(self, layer: "LayerExperts") -> Optional["LayerExperts"]:
        i = self.layers.index(layer)
        return self.layers[i + 1] if i + 1 < len(self.layers) else None

    @property
    def n_slots(self) -> int:
        return self.layers[0].n_slots if self.layers else 0

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.reader.close()


def choose_victims(policy: str, held: np.ndarray, used_at: np.ndarray, uses: np.ndarray, n: int) -> np.ndarray:
    """Positions of the `n` slots to refill among candidates holding experts `held` (-1:
    empty), last used at `used_at`: the empty ones first (used_at -1), then by `policy`;
    `uses` is the decayed use count of every expert (lrfu)."""
    if policy == "lru":
        return np.argsort(used_at, kind="stable")[:n]
    return np.lexsort((used_at, uses[np.maximum(held, 0)], held >= 0))[:n]


def runs(experts: np.ndarray) -> List[Tuple[int, int]]:
    """Sorted expert ids as [a, b) ranges of consecutive ids: one read per range and tensor."""
    if experts.size == 0:
        return []
    cuts = np.nonzero(np.diff(experts) != 1)[0] + 1
    return [(int(g[0]), int(g[-1]) + 1) for g in np.split(experts, cuts)]


IN_FLUX = -2  # expert_in's mark for a slot a read is writing into: never handed out


class LayerExperts(ABC):
    """One MoE layer's slot table and its routed experts over the pool.

    `tensors` maps the switch_mlp's parameter names ("gate_proj.weight", ...) to the stored
    stacked tensors [n_experts, ...]; `router` is the layer's own router (for guesses made
    by the layer before it); `parts` (tensor parallel: `rank_parts`) the part of each
    expert's row of a tensor that this process holds, whole where absent. Subclasses say
    how a miss gets into the pool: `stage` starts reads, `ensure` makes a round's experts
    resident, `drop_staged` ends a step's guesses.
    """

    guess_share = 1.0  # of the slots that the previous layer's guess may take

    def __init__(self, streamer: ExpertStreamer, tensors: Dict[str, StoredTensor], n_slots: int, router,
                 parts: Optional[Dict[str, RowSlice]] = None):
        self.streamer = streamer
        self.tensors = tensors
        self.parts = parts or {}
        self.router = router
        self.n_slots = n_slots
        n_experts = max(t.shape[0] for t in tensors.values())  # mlx-vlm's down_proj: one more, the shared expert
        self.slot_of = np.full(n_experts, -1, np.int64)
        self.expert_in = np.full(n_slots, -1, np.int64)
        self.used_at = np.full(n_slots, -1, np.int64)  # empty slots (-1) are taken first
        self.uses = np.zeros(n_experts)  # per expert, decayed (lrfu)
        self.clock = 0
        self.staged: Dict[int, object] = {}  # expert -> its read in flight

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
        return {k: mx.zeros((self.n_slots, *self.row_shape(k)), DTYPES[t.tag].mlx) for k, t in self.tensors.items()}

    def row_shape(self, k: str) -> Tuple[int, ...]:
        part = self.parts.get(k)
        return self.tensors[k].shape[1:] if part is None else part.shape(self.tensors[k].shape[1:])

    def round_size(self) -> int:
        """Experts per round when a step needs more than there are slots."""
        return self.n_slots

    def bind(self, mlp) -> None:
        """Called with the layer's SwitchGLU once its pool is in place (SparseMoeBlock.stream)."""

    def in_use(self, y: mx.array) -> mx.array:
        """`y`, lazily computed from the pool (the copy path's updates leave it its own buffers)."""
        return y

    @abstractmethod
    def stage(self, experts: np.ndarray, protect: Optional[np.ndarray] = None):
        """Start reading the experts that are neither resident nor on their way."""

    @abstractmethod
    def ensure(self, mlp, needed: np.ndarray, ahead: Optional[np.ndarray] = None) -> None:
        """Make `needed` (unique, at most n_slots) resident, starting `ahead`'s reads meanwhile."""

    @abstractmethod
    def drop_staged(self) -> None:
        """End the step's reads that nobody asked for."""

    def _count(self, needed: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(hits, misses) of a round, counted, the hits marked as just used."""
        stats = self.streamer.stats
        self.clock += 1
        self.uses *= 0.5 ** (1 / HALF_LIFE)
        self.uses[needed] += 1
        resident = self.slot_of[needed] >= 0
        hits, misses = needed[resident], needed[~resident]
        self.used_at[self.slot_of[hits]] = self.clock
        stats.hits += int(hits.size)
        stats.misses += int(misses.size)
        return hits, misses

    def victims(self, candidates: np.ndarray, n: int) -> np.ndarray:
        """The `n` of the slots `candidates` that the streamer's policy refills first."""
        return candidates[choose_victims(self.streamer.policy, self.expert_in[candidates],
                                         self.used_at[candidates], self.uses, n)]

    def _count_reads(self, n: int) -> None:
        self.streamer.stats.reads += n
        self.streamer.stats.bytes_read += n * self.read_nbytes

    # -- the layer's routed experts -----------------------------------------------------------------------
    def __call__(self, mlp, x: mx.array, inds: mx.array) -> mx.array:
        """What mlp(x, inds) computes over all the layer's experts, over the slot pool: [..., k, D]."""
        nxt = self.streamer.next_after(self) if self.streamer.prefetch else None
        guess = nxt.router(x)[0] if nxt is not None else None
        mx.eval(inds if guess is None else [inds, guess])
        ids = np.array(inds).reshape(-1).astype(np.int64)
        needed = np.unique(ids)
        size = self.n_slots if needed.size <= self.n_slots else self.round_size()
        if needed.size > size:  # residents first: the first rounds read least, later ones stream
            needed = np.concatenate([needed[self.slot_of[needed] >= 0], needed[self.slot_of[needed] < 0]])
        rounds = [needed[i:i + size] for i in range(0, needed.size, size)]
        early = np.isin(needed, list(self.staged)) & (self.slot_of[needed] < 0)
        self.streamer.stats.prefetched += int(early.sum())
        self.stage(rounds[0])
        if guess is not None:
            nxt.stage(np.unique(np.array(guess))[: max(1, int(nxt.n_slots * nxt.guess_share))])
        try:
            if len(rounds) == 1:
                self.ensure(mlp, rounds[0])
                return self.in_use(mlp(x, mx.array(self.slot_of[ids].reshape(inds.shape).astype(np.uint32))))
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
            self.ensure(mlp, group, rounds[r + 1] if r + 1 < len(rounds) else None)  # the next is read meanwhile
            pairs = np.nonzero(np.isin(ids, group))[0]
            slots = mx.array(self.slot_of[ids[pairs]].astype(np.uint32))[:, None]
            y = mlp(flat[mx.array(pairs // k)], slots)[:, 0]
            mx.eval(y)  # before the next round's reads overwrite the slots it reads
            outs.append(y)
            order.append(pairs)
        back = mx.array(np.argsort(np.concatenate(order)))
        return mx.concatenate(outs)[back].reshape(*inds.shape, D)


class SlotRead:
    """One expert's read straight into a pool slot: every tensor's row, in pieces of at most PIECE bytes."""

    def __init__(self, layer: "DirectLayerExperts", expert: int, slot: int):
        self.expert, self.slot, self.cancelled, self.dropped = expert, slot, False, False
        reader, pool = layer.streamer.reader, layer.streamer.executor
        self.futures: List[Future] = []
        for k, t in layer.tensors.items():
            part = layer.parts.get(k)
            n = part_nbytes(t, part)
            dest = np.frombuffer(layer.views[k][slot * n:(slot + 1) * n], np.uint8)
            span = part_span(t, part)
            if span is None:  # a strided part: sliced out of the whole row
                self.futures.append(pool.submit(reader.read_part_into, t, expert, part, dest))
                continue
            start = expert * t.row_nbytes + span[0]
            for a in range(0, n, PIECE):
                self.futures.append(pool.submit(reader.read_at, t, start + a, dest[a:a + PIECE]))

    def done(self) -> bool:
        return all(f.done() for f in self.futures)

    def wait(self) -> None:
        for f in self.futures:
            f.result()  # a failed read raises here, naming the file

    def succeeded(self) -> bool:
        return not self.cancelled and all(not f.cancelled() and f.exception() is None for f in self.futures)

    def cancel(self) -> bool:
        """Cancel what has not started; True if nothing is still writing into the slot. A read
        with any piece cancelled is incomplete: its slot is emptied once the rest is done."""
        self.cancelled |= any([f.cancel() for f in self.futures])
        return self.done()


class DirectLayerExperts(LayerExperts):
    """Misses read straight into the pool's memory: no buffer, no copy (model/expert_copies.py
    is the path for backends whose arrays the CPU cannot write in place).

    A slot is chosen when its read starts (the least recently used of those the step does
    not use) and marked IN_FLUX until the read has succeeded: the slot table never names an
    expert whose bytes are not all in place, and a failed read leaves its slot empty. A
    step that needs more experts than there are slots runs in rounds of half the slots:
    the next round is read into the other half while one computes. A guess that the true
    routing does not ask for is not undone: its expert stays, as a cache would keep it."""

    guess_share = 0.5

    def __init__(self, streamer, tensors, n_slots, router, parts=None):
        super().__init__(streamer, tensors, n_slots, router, parts)
        self.views: Dict[str, memoryview] = {}
        self.addresses: Dict[str, int] = {}
        self.pending: Optional[mx.array] = None

    def round_size(self) -> int:
        return max(1, self.n_slots // 2)

    def in_use(self, y: mx.array) -> mx.array:
        self.pending = y
        return y

    def _settle_pending(self) -> None:
        """Before a read may write into a slot: the last lazily returned output computed from the
        pool is computed (in generation it already is: the next token needed it; a caller that
        feeds tokens without evaluating the logits would otherwise see overwritten slots)."""
        if self.pending is not None:
            mx.eval(self.pending)
            self.pending = None

    def bind(self, mlp) -> None:
        """Writable views of the pool's buffers (evaluated arrays; `ensure` checks they are still
        the layer's, so a pool replaced after loading is never written through a stale view)."""
        params = dict(tree_flatten(mlp.parameters()))
        self.views = {k: memoryview(params[k]).cast("B") for k in self.tensors}
        self.addresses = self.buffers_of(mlp)

    def buffers_of(self, mlp) -> Dict[str, int]:
        """Where the pool's tensors live (a compiled step may re-wrap the arrays, not move them)."""
        params = dict(tree_flatten(mlp.parameters()))
        return {k: ctypes.addressof(ctypes.c_char.from_buffer(memoryview(params[k]).cast("B"))) for k in self.tensors}

    def _reap(self, wait_for: Optional[SlotRead] = None, keep=()) -> None:
        """Settle finished reads of experts not in `keep` (guesses): a success is resident, a failure empty."""
        if wait_for is not None:
            for f in wait_for.futures:
                if not f.cancelled():
                    f.exception()  # waits; errors are read below
        for e, read in list(self.staged.items()):
            if e not in keep and read.done():
                del self.staged[e]
                self._settle(read, read.succeeded())

    def _settle(self, read: SlotRead, ok: bool) -> None:
        if ok:
            self.slot_of[read.expert] = read.slot
            self.expert_in[read.slot] = read.expert
        else:
            self.expert_in[read.slot] = -1
            self.used_at[read.slot] = -1

    def stage(self, experts: np.ndarray, protect: Optional[np.ndarray] = None) -> np.ndarray:
        """Start reading the experts that are neither resident nor on their way into free slots:
        never a slot in flux, in `protect`, or holding one of `experts`. Returns those left for
        want of a slot."""
        self._settle_pending()
        experts = np.asarray(experts, np.int64)
        guard = np.zeros(self.n_slots, bool) if protect is None else protect.copy()
        guard |= self.expert_in == IN_FLUX
        held = self.slot_of[experts]
        guard[held[held >= 0]] = True
        todo = [int(e) for e in np.unique(experts) if self.slot_of[e] < 0 and int(e) not in self.staged]
        free = self.victims(np.nonzero(~guard)[0], len(todo))
        for e, slot in zip(todo, free):
            old = self.expert_in[slot]
            if old >= 0:
                self.slot_of[old] = -1
            self.expert_in[slot] = IN_FLUX
            self.used_at[slot] = self.clock
            self.staged[e] = SlotRead(self, e, int(slot))
        self._count_reads(min(len(todo), len(free)))
        return np.array(todo[len(free):], np.int64)

    def ensure(self, mlp, needed: np.ndarray, ahead: Optional[np.ndarray] = None) -> None:
        """Make `needed` (unique, at most n_slots) resident, starting `ahead`'s reads meanwhile."""
        if self.buffers_of(mlp) != self.addresses:
            raise RuntimeError("the streamed experts' pool was replaced after loading")
        hits, misses = self._count(needed)
        keep = np.zeros(self.n_slots, bool)
        keep[self.slot_of[hits]] = True
        for e in misses:  # a read cancelled or failed in an earlier step is never waited on: read again
            read = self.staged.get(int(e))
            if read is not None and (read.cancelled or (read.done() and not read.succeeded())):
                for f in read.futures:
                    if not f.cancelled():
                        f.exception()  # waits for what still writes into the slot
                del self.staged[int(e)]
                self._settle(read, False)
        left = self.stage(misses, keep)
        while left.size:  # every other slot is taken by a guess still being read: let it finish
            wanted = set(misses.tolist())
            self._reap(wait_for=next(r for e, r in self.staged.items() if e not in wanted), keep=wanted)
            left = self.stage(left, keep)
        if ahead is not None:
            keep[[self.staged[int(e)].slot for e in misses]] = True
            self.stage(ahead, keep)
        failed = None
        for e in misses:
            read = self.staged.pop(int(e))
            try:
                read.wait()
            except BaseException as err:
                failed = failed or err
                read.cancel()
                read.dropped = True
                self.staged[int(e)] = read  # settled (emptied) once nothing writes into it
                continue
            self._settle(read, True)
            self.used_at[read.slot] = self.clock
        if failed is not None:
            raise failed

    def drop_staged(self) -> None:
        """Guesses nobody asked for: reads not yet begun are cancelled (their slots left empty);
        those under way finish and are kept."""
        for e, read in list(self.staged.items()):
            if not read.dropped:
                read.dropped = True
                self.streamer.stats.guessed_unused += 1
            if read.cancel():
                del self.staged[e]
                self._settle(read, read.succeeded())
def layer_tensors(tensors: Dict[str, StoredTensor], layer: int) -> Dict[str, StoredTensor]:
    """The stored switch_mlp tensors of decoder layer `layer`, by their names inside the SwitchGLU.

    mlx-vlm's converter stores gate and up as one `gate_up_proj` [E(+1), 2I, ...] (gate's
    rows first, the shared expert packed in as expert E): both names then point at it, and
    `fused_parts` says which rows of each expert's row are which."""
    prefix = f"language_model.model.layers.{layer}{EXPERTS}"
    out = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}
    for k in [k for k in out if k.startswith("gate_up_proj.")]:
        fused = out.pop(k)
        kind = k.split(".", 1)[1]
        out[f"gate_proj.{kind}"] = out[f"up_proj.{kind}"] = fused
    if not out:
        raise ExpertMemoryError(
            f"--expert-memory needs the experts stacked per layer as `minimax-m3 convert` (or mlx-lm's or "
            f"mlx-vlm's converter) writes them; this folder has no {prefix}* tensors")
    return out


def fused_parts(tensors: Dict[str, StoredTensor]) -> Dict[str, RowSlice]:
    """For a layer whose gate and up share one stored tensor (`layer_tensors`): gate's half
    of each expert's rows and up's, each one contiguous range of the row."""
    out = {}
    for k, t in tensors.items():
        if ".gate_up_proj." in t.name:
            half = t.shape[1] // 2
            out[k] = RowSlice(0, 0, half) if k.startswith("gate_proj.") else RowSlice(0, half, 2 * half)
    return out


def layer_parts(tensors: Dict[str, StoredTensor], n: int, rank: int) -> Dict[str, RowSlice]:
    """The part of each expert's stored row that a process holds: rank `rank` of `n` under
    tensor parallelism (`rank_parts`), or gate's and up's halves of a fused tensor."""
    fused = fused_parts(tensors)
    if fused and n > 1:
        raise ExpertMemoryError("--expert-memory does not run tensor parallel on a folder whose gate and up "
                                "are fused (mlx-vlm's converter); convert it with `minimax-m3 convert`")
    return fused or rank_parts(tensors, n, rank)


def gigabytes(n: int) -> str:
    return f"{n / 1e9:.3g} GB" if n >= 1e8 else f"{n / 1e6:.3g} MB" if n >= 1e5 else f"{n} bytes"


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


def slots_for(expert_memory: int, layers: List[Dict[str, StoredTensor]], top_k: int,
              parts: Optional[Dict[str, RowSlice]] = None) -> int:
    """Slots per layer that `expert_memory` bytes buy (at most every expert); a budget below
    one token's top-k experts in every layer is refused, naming the minimum. `parts`
    (`layer_parts`): the slots hold only that part of each expert."""
    parts = parts or {}
    per_slot = sum(sum(part_nbytes(t, parts.get(k)) for k, t in ts.items()) for ts in layers)  # one slot per layer
    n_experts = min(t.shape[0] for t in layers[0].values())  # the routed ones
    least = top_k * per_slot
    if expert_memory < least:
        raise ExpertMemoryError(
            f"--expert-memory {gigabytes(expert_memory)} is below the minimum of {gigabytes(least)} "
            f"(the {top_k} experts one token uses in each of {len(layers)} MoE layers)")
    return min(n_experts, expert_memory // per_slot)


def read_ahead_bytes(n_slots: int, layers: List[Dict[str, StoredTensor]], top_k: int) -> int:
    """Bytes of reads allowed ahead of need: READ_AHEAD_SHARE of the pools, and at least one
    token's top-k experts of a layer (a decode step's guess for the next layer)."""
    per_expert = max(sum(t.row_nbytes for t in ts.values()) for ts in layers)
    return max(top_k * per_expert, int(READ_AHEAD_SHARE * n_slots * per_expert * len(layers)))


_IN_PLACE: Dict[str, bool] = {}


def writes_in_place() -> bool:
    """Whether bytes written through an evaluated array's buffer are what the default device
    computes with (Metal's shared memory, MLX's CPU). Probed once per device: write through
    the buffer, then let the device read it back."""
    key = str(mx.default_device())
    if key not in _IN_PLACE:
        try:
            a = mx.zeros((4,), mx.uint32)
            mx.eval(a)
            memoryview(a).cast("B")[4:8] = (7).to_bytes(4, "little")
            _IN_PLACE[key] = (a + 0).tolist() == [0, 7, 0, 0]
        except (BufferError, TypeError, ValueError, RuntimeError):
            _IN_PLACE[key] = False
    return _IN_PLACE[key]
