"""Routing traces: which experts each MoE layer's router chose, step by step (--expert-trace).

A trace is what `scripts/expert_policies.py` replays through cache policies (the ones the
pools of experts.py run, others, and Belady's optimum) to get the hit rate that a budget of
--expert-memory gives, the curve `plan --hit-curve` then uses. Recording is
opt-in: Model.record_experts(trace) hands each SparseMoeBlock a hook; without one the block
pays one attribute test per call.

A record is one call of one layer: its router's choices [batch, tokens, top_k], kept in
token order (row-major), so a replay sees each call's set of experts as the layer did. A
step is one forward pass of the model: it begins where a layer comes again that is not
after the last one recorded (layers run in order within a pass).

The file (.npz): per record `layer`, `step`, `batch`, `length` (tokens per row); `experts`,
every record's choices flattened one after the other (rows x length x top_k each);
`n_experts`, `top_k`, and `source`, a line saying where the routing came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import mlx.core as mx
import numpy as np

# Choices are kept as MLX arrays until this many are pending, then read in one go: reading
# each one as it comes would make every layer wait for its router, where the resident path
# builds the whole step's graph first.
PENDING = 4096


class ExpertTrace:
    """Records the routing of a model's MoE layers; `save` writes the .npz."""

    def __init__(self, n_experts: int, top_k: int, source: str = ""):
        self.n_experts, self.top_k, self.source = n_experts, top_k, source
        self.layers: List[int] = []
        self.steps: List[int] = []
        self.shapes: List[Tuple[int, int]] = []
        self.parts: List[np.ndarray] = []
        self.pending: List[mx.array] = []
        self.step = -1
        self.last_layer: Optional[int] = None

    def for_layer(self, layer: int):
        """The hook SparseMoeBlock calls with its router's choices."""
        return partial(self.record, layer)

    def record(self, layer: int, inds: mx.array) -> None:
        if self.last_layer is None or layer <= self.last_layer:
            self.step += 1
        self.last_layer = layer
        B, L = (1, inds.shape[0]) if inds.ndim == 2 else inds.shape[:2]
        self.layers.append(layer)
        self.steps.append(self.step)
        self.shapes.append((B, L))
        self.pending.append(inds)
        if len(self.pending) >= PENDING:
            self._read_pending()

    def _read_pending(self) -> None:
        mx.eval(self.pending)
        self.parts += [np.array(a).reshape(-1).astype(np.uint16) for a in self.pending]
        self.pending.clear()

    def __len__(self) -> int:
        return len(self.layers)

    def save(self, path) -> Path:
        """Write the trace; the file appears whole or not at all."""
        self._read_pending()
        path = Path(path)
        tmp = path.with_name(path.name + ".partial")
        shapes = np.array(self.shapes, np.int32).reshape(-1, 2)
        with open(tmp, "wb") as f:
            np.savez_compressed(
                f, layer=np.array(self.layers, np.int16), step=np.array(self.steps, np.int32),
                batch=shapes[:, 0], length=shapes[:, 1],
                experts=np.concatenate(self.parts) if self.parts else np.zeros(0, np.uint16),
                n_experts=np.int32(self.n_experts), top_k=np.int32(self.top_k), source=np.array(self.source))
        tmp.replace(path)
        return path


@dataclass
class Record:
    layer: int
    step: int
    batch: int
    length: int
    experts: np.ndarray  # [batch * length * top_k], token order

    @property
    def decode(self) -> bool:
        """One new token per row: a decode step (else a prefill chunk)."""
        return self.length == 1


@dataclass
class LoadedTrace:
    layer: np.ndarray
    step: np.ndarray
    batch: np.ndarray
    length: np.ndarray
    experts: np.ndarray
    n_experts: int
    top_k: int
    source: str

    def records(self) -> Iterator[Record]:
        ends = np.cumsum(self.batch.astype(np.int64) * self.length * self.top_k)
        starts = ends - self.batch.astype(np.int64) * self.length * self.top_k
        for i in range(len(self.layer)):
            yield Record(int(self.layer[i]), int(self.step[i]), int(self.batch[i]), int(self.length[i]),
                         self.experts[starts[i]:ends[i]].astype(np.int64))

    @property
    def moe_layers(self) -> List[int]:
        return sorted(set(self.layer.tolist()))


def load_trace(path) -> LoadedTrace:
    """Read a trace that ExpertTrace.save wrote; a file that is not one is refused by name."""
    try:
        with np.load(path) as z:
            t = LoadedTrace(z["layer"], z["step"], z["batch"], z["length"], z["experts"],
                            int(z["n_experts"]), int(z["top_k"]), str(z["source"]))
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"{path}: not an expert trace written by --expert-trace ({e})") from None
    if int((t.batch.astype(np.int64) * t.length).sum()) * t.top_k != t.experts.size:
        raise ValueError(f"{path}: its records do not add up to its expert ids (a damaged trace)")
    return t
