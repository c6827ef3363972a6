"""The fallback way misses get into the pool: read into buffers, then copied into their slots.

For backends whose arrays the CPU cannot write in place (experts.writes_in_place says;
Metal and MLX's CPU can, so DirectLayerExperts serves them). Runs of consecutive experts
are read as one range per tensor into buffers outside the pool (at most the streamer's
read-ahead of them), then copied into the slots the policy frees, a batch at a time.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import List, Optional, Tuple

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..io.dtypes import DTYPES
from ..io.reader import part_nbytes, to_mx
from . import experts as base
from .experts import LayerExperts, runs


class RunRead:
    """The rows of experts [a, b) of every tensor of a layer, read on the streamer's threads in
    pieces of at most PIECE bytes: a long run (a prefill round) keeps several reads in flight,
    which is what an SSD needs to reach its sequential speed."""

    def __init__(self, layer: "CopyingLayerExperts", a: int, b: int):
        self.a, self.b = a, b
        self.rows = {k: np.empty((b - a, part_nbytes(t, layer.parts.get(k))), np.uint8)
                     for k, t in layer.tensors.items()}
        self.nbytes = (b - a) * layer.expert_nbytes
        reader, pool = layer.streamer.reader, layer.streamer.executor
        self.futures: List[Future] = []
        for k, t in layer.tensors.items():
            part = layer.parts.get(k)
            if part is not None:  # a rank's part of each row: one read (or sliced row) per expert
                self.futures += [pool.submit(reader.read_part_into, t, r, part, self.rows[k][r - a])
                                 for r in range(a, b)]
                continue
            step = max(1, base.PIECE // max(1, t.row_nbytes))
            for r in range(a, b, step):
                s = min(b, r + step)
                self.futures.append(pool.submit(reader.read_rows_into, t, (r, s), self.rows[k][r - a:s - a]))

    def wait(self) -> None:
        for f in self.futures:
            f.result()  # a failed read raises here, naming the file

    def cancel(self) -> None:
        for f in self.futures:
            f.cancel()


class CopyingLayerExperts(LayerExperts):
    """Misses read into buffers and copied into the pool (see the module's docstring)."""

    # -- reads ------------------------------------------------------------------------------------------
    def stage(self, experts: np.ndarray, protect: Optional[np.ndarray] = None, needed: bool = False) -> np.ndarray:
        """Start reading the experts that are neither resident nor on their way, in order, while the
        streamer's read-ahead allows: a guess or a later round never holds more than
        `streamer.read_ahead` bytes of buffers; experts a step needs now always get one run.
        Returns the experts left unstaged."""
        experts = np.asarray(experts, np.int64)
        todo = np.unique(experts[(self.slot_of[experts] < 0) & ~np.isin(experts, list(self.staged))])
        streamer, per = self.streamer, self.expert_nbytes
        stuck = needed and not np.isin(experts, list(self.staged)).any()  # the step waits on a read: start one
        most = max(1, streamer.read_ahead // 2 // per)  # runs of half the window: one is copied while one is read
        left = []
        for a, b in runs(todo):
            for c in range(a, b, most):
                d = min(b, c + most)
                if streamer.staged_bytes + (d - c) * per > streamer.read_ahead and not stuck:
                    left.extend(range(c, d))
                    continue
                run = RunRead(self, c, d)
                self._count_reads(d - c)
                stuck = False
                streamer.staged_bytes += run.nbytes
                streamer.stats.peak_staged_bytes = max(streamer.stats.peak_staged_bytes, streamer.staged_bytes)
                for e in range(c, d):
                    self.staged[e] = run
        return np.array(left, np.int64)

    def _release(self, run: RunRead, used: int = 0) -> None:
        """Forget a run: its buffers go, its experts no longer count as on their way."""
        for e in range(run.a, run.b):
            if self.staged.get(e) is run:
                del self.staged[e]
        self.streamer.staged_bytes -= run.nbytes
        self.streamer.stats.guessed_unused += (run.b - run.a) - used

    def drop_staged(self) -> None:
        """Forget reads nobody asked for (wrong guesses): they cost bandwidth only."""
        for run in {id(r): r for r in self.staged.values()}.values():
            run.cancel()
            self._release(run)

    # -- residency ------------------------------------------------------------------------------------
    def ensure(self, mlp, needed: np.ndarray, ahead: Optional[np.ndarray] = None) -> None:
        """Make the experts `needed` (unique, at most n_slots) resident in `mlp`'s pool, then
        start `ahead`'s reads (within the read-ahead).

        Misses are committed a batch of runs at a time (at most the read-ahead's bytes of
        buffers): each batch's slots change only after its reads succeeded, so a read that
        fails (a file deleted or truncated since loading) leaves every slot holding the
        expert its table names: the pool can never hand out another expert's weights."""
        hits, pending = self._count(needed)
        keep = np.zeros(self.n_slots, bool)  # slots this step uses: never victims
        keep[self.slot_of[hits]] = True
        while pending.size:
            self.stage(pending, needed=True)
            batch = self._next_batch(pending)
            self._commit(mlp, batch, keep)
            pending = pending[~np.isin(pending, np.concatenate([b for _, b in batch]))]
        if ahead is not None:
            self.stage(ahead)

    def _next_batch(self, pending: np.ndarray) -> List[Tuple[RunRead, np.ndarray]]:
        """The staged runs holding the first pending experts, up to half the read-ahead's bytes
        (the other half is being read while this batch is copied into the pool)."""
        batch, nbytes = [], 0
        for e in pending:
            run = self.staged.get(int(e))
            if run is None or any(r is run for r, _ in batch):
                continue
            if batch and nbytes + run.nbytes > self.streamer.read_ahead // 2:
                break
            batch.append((run, pending[(pending >= run.a) & (pending < run.b)]))
            nbytes += run.nbytes
        return batch

    def _commit(self, mlp, batch: List[Tuple[RunRead, np.ndarray]], keep: np.ndarray) -> None:
        """Wait for the batch's reads, then copy its experts into the slots the policy frees."""
        try:
            for run, _ in batch:
                run.wait()
        except BaseException:
            for run, _ in batch:
                self._release(run)
            raise
        experts = np.concatenate([e for _, e in batch])
        rows = {}
        for k, t in self.tensors.items():
            parts = [run.rows[k] if e.size == run.b - run.a else run.rows[k][e - run.a] for run, e in batch]
            flat = parts[0] if len(parts) == 1 else np.concatenate(parts)
            rows[k] = flat.view(DTYPES[t.tag].numpy).reshape(experts.size, *self.row_shape(k))
        for run, e in batch:
            self._release(run, used=e.size)

        victims = self.victims(np.nonzero(~keep)[0], experts.size)
        where = mx.array(victims.astype(np.uint32))
        params = dict(tree_flatten(mlp.parameters()))
        for k, t in self.tensors.items():
            params[k][where] = to_mx(t, rows[k])  # in place: the pool is the array's only holder
        mx.eval([params[k] for k in self.tensors])
        old = self.expert_in[victims]
        self.slot_of[old[old >= 0]] = -1
        self.expert_in[victims] = experts
        self.slot_of[experts] = victims
        self.used_at[victims] = self.clock
        keep[victims] = True
