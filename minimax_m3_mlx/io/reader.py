"""Reading checkpoint folders: the one safetensors header parser and tensor locator.

`locate` finds every tensor of a folder (file, byte offset, dtype, shape) from the headers
alone, checking the files against the index and the headers against the file sizes.
`load_arrays` hands the whole folder to MLX's lazy loader; `TensorReader` reads single
tensors, row ranges or slices of them, for streaming conversion and per-rank loading.

The header is parsed here rather than through `safetensors.safe_open` because the byte
offsets are what ranged reads need, and numpy (safe_open's non-torch framework) has no
bfloat16 or float8 to read those tensors as.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import mlx.core as mx
import numpy as np

from .dtypes import DTYPES, nbytes

INDEX = "model.safetensors.index.json"
# The safetensors format's own bound on the header (its MAX_HEADER_SIZE): a length past it
# is not a header cut short but bytes that were never a safetensors file.
MAX_HEADER = 100_000_000


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: the message names the file or tensor."""


def read_header(path: Path) -> Tuple[dict, int]:
    """(header, byte offset of the data section) of a safetensors file, after checking that
    the file holds all the data its header describes."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER:
            raise CheckpointError(f"{path}: not a safetensors file (its first 8 bytes give a header of {n} bytes)")
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated safetensors file (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
            if not isinstance(header, dict) or not all(
                    isinstance(v, dict) and "data_offsets" in v for k, v in header.items() if k != "__metadata__"):
                raise ValueError("not a table of tensors")
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file: its header needs {8 + n + end} bytes, the file has {size}"
        )
    return header, 8 + n


def index_map(folder: Path) -> Optional[Dict[str, str]]:
    """The index's tensor -> file map, or None for a folder without an index."""
    index = folder / INDEX
    if not index.exists():
        return None
    try:
        return json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{index}: not a safetensors index ({e})") from None


def weight_files(folder: Path) -> List[Path]:
    """The shards of a checkpoint folder, checked against its index when there is one."""
    weight_map = index_map(folder)
    if weight_map is not None:
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (folder / f).exists()]
        if missing:
            raise CheckpointError(f"{folder / INDEX} names shard(s) that do not exist: {', '.join(missing)}")
        return [folder / f for f in files]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no .safetensors files in {folder}")
    return files


@dataclass(frozen=True)
class StoredTensor:
    """Where a tensor's bytes are: file, absolute offset, safetensors dtype and shape."""

    name: str
    file: Path
    tag: str
    shape: Tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def row_nbytes(self) -> int:
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else self.nbytes

    def rows_nbytes(self, rows: Optional[Tuple[int, int]]) -> int:
        return self.nbytes if rows is None or not self.shape else (rows[1] - rows[0]) * self.row_nbytes


def locate(folder: Path) -> Dict[str, StoredTensor]:
    """Every tensor of a checkpoint folder, from its headers (no tensor data is read).

    Truncated or corrupt files, index entries pointing at missing files or at shards that
    lack the tensor, a tensor in two shards, a dtype no MiniMax-M3 layout uses and a span
    that does not fit its shape are errors naming the file.
    """
    weight_map = index_map(folder)
    out: Dict[str, StoredTensor] = {}
    for f in weight_files(folder):
        header, data_start = read_header(f)
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if name in out:
                raise CheckpointError(f"{f}: tensor {name} is also in {out[name].file.name}")
            out[name] = _stored(f, name, entry, data_start)
        if weight_map is not None:
            absent = sorted(k for k, v in weight_map.items() if v == f.name and k not in header)
            if absent:
                raise CheckpointError(f"{f}: the index places {absent[:5]} in this shard but it lacks them")
    return out


def file_tensors(path: Path) -> Tuple[dict, Dict[str, StoredTensor]]:
    """One safetensors file's metadata and tensors, checked as `locate` checks them."""
    header, start = read_header(path)
    tensors = {name: _stored(path, name, entry, start) for name, entry in header.items() if name != "__metadata__"}
    return header.get("__metadata__") or {}, tensors


def _stored(f: Path, name: str, entry: dict, data_start: int) -> StoredTensor:
    tag, shape = entry.get("dtype"), tuple(int(d) for d in entry.get("shape", ()))
    if tag not in DTYPES:
        raise CheckpointError(f"{f}: tensor {name} has dtype {tag}, which no MiniMax-M3 layout uses")
    start, end = entry["data_offsets"]
    expect = nbytes(shape, tag)
    if end - start != expect:
        raise CheckpointError(f"{f}: tensor {name} spans {end - start} bytes; {tag}{list(shape)} needs {expect}")
    return StoredTensor(name, f, tag, shape, data_start + start, end - start)


def load_arrays(folder: Path) -> Dict[str, mx.array]:
    """Every tensor of a checkpoint folder (checked as `locate` checks), memory-mapped lazily by MLX."""
    tensors = locate(folder)
    arrays: Dict[str, mx.array] = {}
    for f in sorted({t.file for t in tensors.values()}):
        arrays.update(mx.load(str(f)))
    return arrays


def to_mx(t: StoredTensor, data: np.ndarray) -> mx.array:
    """An MLX array of the bytes read for `t` (BF16 read as uint16 is viewed as bfloat16)."""
    a = mx.array(data)
    dtype = DTYPES[t.tag].mlx
    return a if a.dtype == dtype else a.view(dtype)


def placeholder(t: StoredTensor, rows: Optional[Tuple[int, int]] = None) -> mx.array:
    """A lazy array of the tensor's (or its rows') shape and dtype, for dry runs; never evaluated."""
    shape = t.shape if rows is None else (rows[1] - rows[0], *t.shape[1:])
    return mx.zeros(shape, DTYPES[t.tag].mlx)


class TensorReader:
    """Reads tensors, row ranges or slices of them; counts the bytes it hands out."""

    def __init__(self):
        self._files = {}
        self._maps: Dict[Path, np.memmap] = {}
        self.bytes_read = 0

    def read_rows(self, t: StoredTensor, rows: Optional[Tuple[int, int]] = None) -> np.ndarray:
        """Rows [a, b) of `t` (all without `rows`) read into a fresh buffer. No memory map: a
        streaming conversion reads every byte once and must not keep the pages mapped."""
        f = self._files.get(t.file)
        if f is None:
            f = self._files[t.file] = open(t.file, "rb")
        n = t.rows_nbytes(rows)
        buf = np.empty(n, np.uint8)  # not zero-filled: every byte is read into
        f.seek(t.offset + (0 if rows is None else rows[0] * t.row_nbytes))
        got = f.readinto(memoryview(buf)) if n else 0
        if got != n:
            raise CheckpointError(f"{t.file}: truncated while reading {t.name} ({got} of {n} bytes)")
        self.bytes_read += n
        shape = t.shape if rows is None else (rows[1] - rows[0], *t.shape[1:])
        return buf.view(DTYPES[t.tag].numpy).reshape(shape)

    def read(self, t: StoredTensor, select: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> mx.array:
        """`t`, or the part `select` picks of it (e.g. one rank's slice, any axis), through a
        read-only memory map of its file: only the selected bytes are copied."""
        if t.file not in self._maps:
            self._maps[t.file] = np.memmap(t.file, dtype=np.uint8, mode="r")
        raw = self._maps[t.file][t.offset:t.offset + t.nbytes].view(DTYPES[t.tag].numpy).reshape(t.shape)
        part = np.ascontiguousarray(raw if select is None else select(raw))
        self.bytes_read += part.nbytes
        return to_mx(t, part)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        self._maps.clear()


@dataclass(frozen=True)
class RowSlice:
    """Entries [start, stop) along `axis` of every row of a stacked tensor (axis 0: the row's
    first axis, the tensor's second), in the stored dtype's units (packed words for quantized
    weights): one rank's part of each expert under tensor parallelism."""

    axis: int
    start: int
    stop: int

    def shape(self, row_shape: Tuple[int, ...]) -> Tuple[int, ...]:
        return (*row_shape[:self.axis], self.stop - self.start, *row_shape[self.axis + 1:])

    def contiguous(self, row_shape: Tuple[int, ...]) -> bool:
        """Whether the part is one byte range inside a row (nothing but size-1 axes before it)."""
        return int(np.prod(row_shape[:self.axis], dtype=np.int64)) == 1


def part_nbytes(t: StoredTensor, part: Optional[RowSlice]) -> int:
    """Bytes of one row's part (the whole row without `part`)."""
    return t.row_nbytes if part is None else t.row_nbytes * (part.stop - part.start) // t.shape[1 + part.axis]


def part_span(t: StoredTensor, part: Optional[RowSlice]) -> Optional[Tuple[int, int]]:
    """(byte offset, bytes) of a row's part inside the row where it is one range (the whole
    row without `part`); None for a strided part."""
    if part is None:
        return 0, t.row_nbytes
    if not part.contiguous(t.shape[1:]):
        return None
    unit = t.row_nbytes // t.shape[1 + part.axis]  # bytes of one entry along the axis
    return part.start * unit, (part.stop - part.start) * unit


def read_nbytes(t: StoredTensor, part: Optional[RowSlice]) -> int:
    """Bytes read per row for `part`: the part where it is one range, else the whole row."""
    span = part_span(t, part)
    return t.row_nbytes if span is None else span[1]


class RangeReader:
    """Reads row ranges of tensors with `os.pread`: safe to call from many threads at once
    (no shared file position), so several expert reads can be in flight (model/experts.py)."""

    def __init__(self):
        self._fds: Dict[Path, int] = {}
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.drop_page_cache = False  # benchmarks: every read comes from the disk, not the page cache

    def _fd(self, path: Path) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
            return fd

    def read_at(self, t: StoredTensor, offset: int, buf: np.ndarray) -> None:
        """buf.nbytes bytes of `t` from byte `offset` of its data into `buf` (contiguous): no
        staging copy. A file that ends early, or cannot be read, is an error naming it."""
        n = buf.nbytes
        assert buf.flags.c_contiguous
        view, start, got = memoryview(buf.reshape(-1)).cast("B"), t.offset + offset, 0
        try:
            while got < n:  # a read may return less than asked (Linux: at most ~2 GB at once)
                step = os.preadv(self._fd(t.file), [view[got:]], start + got)
                if step == 0:
                    break
                got += step
        except OSError as e:
            raise CheckpointError(f"{t.file}: cannot read {t.name} ({e.strerror or e})") from None
        if got != n:
            raise CheckpointError(f"{t.file}: truncated while reading {t.name} ({got} of {n} bytes)")
        if self.drop_page_cache:
            os.posix_fadvise(self._fd(t.file), start, n, os.POSIX_FADV_DONTNEED)
        with self._lock:
            self.bytes_read += n

    def read_rows_into(self, t: StoredTensor, rows: Tuple[int, int], buf: np.ndarray) -> None:
        """Rows [a, b) of `t` into `buf` (contiguous, their size in bytes)."""
        assert buf.nbytes == t.rows_nbytes(rows)
        self.read_at(t, rows[0] * t.row_nbytes, buf)

    def read_part_into(self, t: StoredTensor, row: int, part: Optional[RowSlice], buf: np.ndarray) -> None:
        """Row `row`'s part (all of it without `part`) into `buf` (contiguous, its size in bytes).

        A part that is one range inside the row is read as that range; any other part is
        sliced out of the whole row read in memory: a rank's slice of a down projection
        (the last axis) is a short piece of every one of thousands of row vectors, pieces
        smaller than a page that a disk would read whole pages for anyway."""
        span = part_span(t, part)
        if span is not None:
            self.read_at(t, row * t.row_nbytes + span[0], buf)
            return
        whole = np.empty(t.row_nbytes, np.uint8)
        self.read_at(t, row * t.row_nbytes, whole)
        typed = whole.view(DTYPES[t.tag].numpy).reshape(t.shape[1:])
        index = (slice(None),) * part.axis + (slice(part.start, part.stop),)
        buf.reshape(-1).view(np.uint8)[:] = np.ascontiguousarray(typed[index]).reshape(-1).view(np.uint8)

    def read_rows(self, t: StoredTensor, rows: Tuple[int, int], part: Optional[RowSlice] = None) -> np.ndarray:
        """Rows [a, b) of `t` (with `part`: that part of each row) in a fresh buffer."""
        a, b = rows
        shape = t.shape[1:] if part is None else part.shape(t.shape[1:])
        buf = np.empty((b - a, part_nbytes(t, part)), np.uint8)
        if part is None:
            self.read_rows_into(t, rows, buf)
        else:
            for i in range(b - a):
                self.read_part_into(t, a + i, part, buf[i])
        return buf.view(DTYPES[t.tag].numpy).reshape((b - a, *shape))

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
