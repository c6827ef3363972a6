"""Writing a conversion plan: items read ahead, encoded, and written at their planned offsets.

Shard files are laid out in advance, so every result goes straight to its place: peak
memory is one item plus a read-ahead of the next, whatever the model's size. A shard is
recorded in the manifest (size, sha256) when finished; a rerun with the same plan verifies
and keeps those and redoes the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from ..config import ModelArgs
from ..io.dtypes import tag_of
from ..io.reader import TensorReader, to_mx
from ..io.writer import length_prefix
from ..weights.quant import MX_BLOCK, dequantize_fp8_blocks
from . import recipes
from .plan import FileTensor, Param, Plan, Shard, WorkItem, float32_args, transform

MANIFEST = ".convert-manifest.json"


# -- encoding one chunk --------------------------------------------------------------------------------------
def encode(p: Param, out: Dict[str, mx.array], dtype) -> Dict[str, mx.array]:
    """Output tensors (file names -> this chunk's rows) for parameter p from an item's sanitize output."""
    path = p.name.rpartition(".")[0]
    w = out[p.name]
    if p.passthrough:
        return {f"{path}.weight": w, f"{path}.scales": out[f"{path}.scales"]}
    if p.mx_packed:  # MXFP8 bytes + E8M0 scales -> exact float32
        w = dequantize_fp8_blocks(w.view(mx.uint8), out[f"{path}.scales"], (1, MX_BLOCK), p.name, mx.float32)
    keep = recipes.keep_float32_tag(p.name)
    if p.spec is None:
        return {p.name: w.astype(mx.float32 if keep else dtype)}
    # Cast first, as mlx-lm does: affine scales and biases come out in the model dtype.
    parts = mx.quantize(w.astype(dtype), group_size=p.spec.group_size, bits=p.spec.bits, mode=p.spec.mode)
    names = ["weight", "scales", "biases"][: len(parts)]
    return {f"{path}.{n}": a for n, a in zip(names, parts)}


def _bytes(a: mx.array) -> memoryview:
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return memoryview(np.ascontiguousarray(np.asarray(a))).cast("B")


# -- writing shards ---------------------------------------------------------------------------------------------
class ShardWriter:
    """Shard files laid out in advance; chunks land at their offsets; finished shards are hashed."""

    def __init__(self, folder: Path, plan: Plan, manifest: "Manifest", done: set):
        self.folder, self.plan, self.manifest = folder, plan, manifest
        self.done = set(done)
        self.pending = {i: 0 for i in range(len(plan.shards)) if i not in self.done}
        self.handles = {}

    def expect(self, tensor: FileTensor):
        if tensor.shard in self.pending:
            self.pending[tensor.shard] += 1

    def write(self, tensor: FileTensor, rows: Optional[Tuple[int, int]], data: mx.array) -> None:
        if tensor.shard in self.done:
            return
        expect = tensor.shape if rows is None else (rows[1] - rows[0], *tensor.shape[1:])
        if tuple(data.shape) != tuple(expect) or tag_of(data.dtype) != tensor.tag:
            raise AssertionError(f"{tensor.name}: produced {data.dtype}{tuple(data.shape)}, planned "
                                 f"{tensor.tag}{tuple(expect)}")
        shard = self.plan.shards[tensor.shard]
        f = self._open(tensor.shard)
        f.seek(8 + len(shard.header) + tensor.offset + (rows[0] * tensor.row_bytes if rows else 0))
        f.write(_bytes(data))
        self.pending[tensor.shard] -= 1
        if self.pending[tensor.shard] == 0:
            self._finish(tensor.shard)

    def _open(self, i: int):
        f = self.handles.get(i)
        if f is None:
            shard = self.plan.shards[i]
            path = self.folder / shard.name
            f = self.handles[i] = open(path, "w+b")
            f.write(length_prefix(shard.header) + shard.header)
            f.truncate(shard.size)
        return f

    def _finish(self, i: int) -> None:
        f = self.handles.pop(i)
        f.flush()
        os.fsync(f.fileno())
        f.close()
        finish_shard(self.folder, self.plan.shards[i], self.manifest)
        self.done.add(i)
        del self.pending[i]

    def close(self):
        for f in self.handles.values():
            f.close()
        self.handles.clear()


def finish_shard(folder: Path, shard: Shard, manifest: "Manifest") -> None:
    """Record a completed shard (size, sha256): a rerun keeps it after checking both."""
    path = folder / shard.name
    size = path.stat().st_size
    if size != shard.size:
        raise AssertionError(f"{path}: {size} bytes written, {shard.size} planned")
    manifest.record(shard.name, size, sha256_file(path))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


class Manifest:
    """`.convert-manifest.json` in the partial folder: the plan digest and the finished shards."""

    def __init__(self, folder: Path, digest: str):
        self.path = folder / MANIFEST
        self.digest = digest
        self.shards: Dict[str, dict] = {}

    @classmethod
    def resume(cls, folder: Path, digest: str, plan: Plan, log) -> Tuple["Manifest", set]:
        """The finished shards a previous run of the same plan left, each re-verified."""
        m = cls(folder, digest)
        try:
            old = json.loads(m.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            old = {}
        if old and old.get("plan") != digest:
            log(f"{folder} holds a different conversion (other source or options): starting over")
            old = {}
        keep = {s.name for s in plan.shards} if old else set()
        for f in folder.iterdir():  # nothing from another run may end up in the output
            if f.name in keep or f.name == MANIFEST:
                continue
            if f.is_dir() and not f.is_symlink():
                shutil.rmtree(f)
            else:
                f.unlink()
        done = set()
        for i, shard in enumerate(plan.shards):
            rec = old.get("shards", {}).get(shard.name)
            path = folder / shard.name
            if rec is None or not path.exists():
                continue
            if path.stat().st_size == rec["size"] == shard.size and sha256_file(path) == rec["sha256"]:
                m.shards[shard.name] = rec
                done.add(i)
            else:
                log(f"{shard.name}: size or sha256 differs from the manifest: rewriting it")
        m.save()
        return m, done

    def record(self, name: str, size: int, sha: str) -> None:
        self.shards[name] = {"size": size, "sha256": sha}
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"plan": self.digest, "shards": self.shards}, indent=1))
        os.replace(tmp, self.path)


# -- running the plan -----------------------------------------------------------------------------------------------
def run_plan(plan: Plan, args: ModelArgs, writer: ShardWriter, progress: bool) -> Tuple[int, int]:
    """Process the items whose outputs are not all in finished shards; returns (items run, bytes read)."""
    outputs: Dict[int, List[Param]] = {}
    for p in plan.params.values():
        for i, rows in p.chunks:
            outputs.setdefault(i, []).append(p)
            for ft in file_tensors(plan, p):
                writer.expect(ft)
    todo = [i for i in range(len(plan.items))
            if any(ft.shard not in writer.done for p in outputs.get(i, []) for ft in file_tensors(plan, p))]
    total = sum(plan.items[i].nbytes for i in todo)
    dtype = getattr(mx, plan.dtype)
    f32_args = float32_args(args)
    bar = _progress(total, progress)
    reader = TensorReader()
    chunks = _read_ahead(plan.items, todo, reader)
    unit = None
    try:
        for i, raw in chunks:
            item = plan.items[i]
            arrays = {t.name: to_mx(t, data) for (t, _), data in zip(item.parts, raw)}
            out = transform(f32_args, item, arrays)
            for p in outputs.get(i, []):
                rows = next(r for j, r in p.chunks if j == i)
                encoded = encode(p, out, dtype)
                mx.eval(list(encoded.values()))
                for name, a in encoded.items():
                    writer.write(plan.files[name], rows, a)
            del raw, arrays, out
            if item.unit != unit:  # a new layer: its buffer sizes differ, so let MLX's cache go
                unit = item.unit
                mx.clear_cache()
                bar.set_postfix_str(unit, refresh=False)
            bar.update(item.nbytes)
    finally:
        chunks.close()  # waits for a read in flight before the files close
        bar.close()
        reader.close()
    return len(todo), total


def file_tensors(plan: Plan, p: Param) -> List[FileTensor]:
    path = p.name.rpartition(".")[0]
    if p.spec is None:
        return [plan.files[p.name]]
    return [plan.files[n] for n in (f"{path}.weight", f"{path}.scales", f"{path}.biases") if n in plan.files]


def _read_ahead(items: List[WorkItem], todo: List[int], reader: TensorReader) -> Iterator[Tuple[int, list]]:
    """Yield (index, source arrays) with the next item's reads already running (I/O overlaps compute)."""
    def read(i):
        return [reader.read_rows(t, r) for t, r in items[i].parts]

    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(read, todo[0]) if todo else None
        for k, i in enumerate(todo):
            raw = future.result()
            future = pool.submit(read, todo[k + 1]) if k + 1 < len(todo) else None
            yield i, raw


def _progress(total: int, enabled: bool):
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="convert",
                disable=not enabled, smoothing=0.05, file=sys.stderr)
