"""The prompt cache's disk tier: KV caches as files of fixed-size token blocks.

A block holds every layer's cache rows for `block_tokens` tokens (a multiple of the MSA
block). It is named by a hash chain over the token ids up to its end, as prefix-caching
engines name theirs: block i's name depends on all tokens before it, so a prompt's
stored prefix is the run of its chain names that exist, and a turn that adds tokens
writes only its new blocks. The chain starts from the store's identity (the model's
files, the cache kind, the rank): files of another model, setting or rank never match.

Files are safetensors (the package's writer and header reader) whose metadata names the
block (store, chain hash, index, tokens) and holds a CRC-32 of the data. A block is
written to a temporary name and renamed, so readers see whole files only, and two
servers sharing a directory at worst write the same block twice. A block that is
truncated, corrupt, or from another store or format is removed and read as a miss: the
prefix before it is used and the rest recomputed. Writes run on a thread of their own
(the token path only hands over references to the cache buffers, which the prompt cache
no longer changes), and the directory is kept under a byte budget, least recently used
first (a read refreshes a block's time). Files and folders are the owner's only: a KV
cache is the conversation.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import queue
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from ..io.dtypes import DTYPES, tag_of
from ..io.reader import CheckpointError, StoredTensor, file_tensors
from ..io.writer import encode_header, length_prefix

FORMAT = "minimax-m3-mlx prompt-cache block v1"
SUFFIX = ".safetensors"
log = logging.getLogger(__name__)


def chain_hashes(root: str, tokens: Sequence[int], block_tokens: int) -> List[str]:
    """The name of each whole block of `tokens`: h_i = sha256(h_{i-1} + block i's ids)."""
    out, h = [], root
    for i in range(len(tokens) // block_tokens):
        ids = np.asarray(tokens[i * block_tokens:(i + 1) * block_tokens], dtype=np.int64)
        h = hashlib.sha256(h.encode() + ids.tobytes()).hexdigest()
        out.append(h)
    return out


class DiskBudget:
    """The directory's bytes, bounded least recently used first (by file time: a read
    refreshes it). Shared by the stores of one process; other processes' files count too."""

    def __init__(self, root: Path, max_bytes: int):
        self.root, self.max_bytes = root, max_bytes
        self.lock = threading.Lock()
        self.total = 0
        self.rescan()

    def _files(self):
        for sub in self.root.iterdir():
            if sub.is_dir():
                for f in sub.iterdir():
                    if f.suffix in (SUFFIX, ".json"):  # blocks, and the remembered reasoning
                        try:
                            st = f.stat()
                        except FileNotFoundError:
                            continue
                        yield f, st.st_size, st.st_mtime

    def rescan(self) -> None:
        with self.lock:
            self.total = sum(size for _, size, _ in self._files())

    def add(self, nbytes: int, keep: Path) -> None:
        """Count a written block; evict the oldest blocks while over budget (never `keep`)."""
        with self.lock:
            self.total += nbytes
            if self.total <= self.max_bytes:
                return
            files = sorted(self._files(), key=lambda e: (e[2], -_block_index(e[0])))
            self.total = sum(size for _, size, _ in files)
            for f, size, _ in files:
                if self.total <= self.max_bytes:
                    break
                if f == keep:
                    continue
                try:
                    f.unlink()
                except FileNotFoundError:  # another server evicted it
                    pass
                self.total -= size


def _block_index(path: Path) -> int:
    try:
        return int(path.name.split("-", 1)[0])
    except ValueError:
        return 0


class BlockStore:
    """One model's (and rank's) blocks under `root/<store>/`, named `<index>-<chain hash>`."""

    def __init__(self, root: Path, identity: dict, block_tokens: int, budget: DiskBudget):
        self.identity = json.dumps(identity, sort_keys=True, default=str)
        self.key = hashlib.sha256(self.identity.encode()).hexdigest()
        self.block_tokens, self.budget = block_tokens, budget
        self.dir = Path(root) / self.key[:24]
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.bytes_written = self.bytes_read = 0
        self._pending: set = set()
        self._queue: "queue.Queue" = queue.Queue()
        self._warned = False
        self._writer = threading.Thread(target=self._write_loop, name="prompt-cache-writer", daemon=True)
        self._writer.start()

    # -- names ---------------------------------------------------------------------------
    def chain(self, tokens: Sequence[int]) -> List[str]:
        return chain_hashes(self.key, tokens, self.block_tokens)

    def path(self, index: int, chain: str) -> Path:
        return self.dir / f"{index:07d}-{chain}{SUFFIX}"

    def stored_blocks(self, tokens: Sequence[int]) -> int:
        """How many leading whole blocks of `tokens` have a file (not yet verified)."""
        n = 0
        for i, h in enumerate(self.chain(tokens)):
            if not self.path(i, h).exists():
                break
            n += 1
        return n

    # -- writing -------------------------------------------------------------------------
    def save(self, tokens: Sequence[int], buffers: List[List[mx.array]], offset: int) -> int:
        """Queue the blocks of `tokens[:offset]` not stored yet; `buffers` are each layer's
        token buffers (model.cache_blocks.token_buffers). Returns the blocks queued."""
        chain = self.chain(list(tokens)[:offset])
        todo = [(i, h) for i, h in enumerate(chain)
                if h not in self._pending and not self.path(i, h).exists()]
        if not todo:
            return 0
        arrays = _host_views(buffers)
        for _, h in todo:
            self._pending.add(h)
        meta_tokens = list(tokens)
        self._queue.put((todo, arrays, meta_tokens))
        return len(todo)

    def flush(self) -> None:
        """Wait until every queued block is on disk (or given up)."""
        self._queue.join()

    def close(self) -> None:
        self.flush()
        self._queue.put(None)
        self._writer.join(timeout=10)

    def _write_loop(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                todo, arrays, tokens = job
                for i, h in todo:
                    try:
                        self._write_block(i, h, arrays, tokens)
                    except OSError as e:
                        self._disk_error(e)
                    except Exception:  # a block that cannot be written is only a future miss
                        log.exception("prompt-cache disk tier: block %d not written", i)
                    finally:
                        self._pending.discard(h)
            finally:
                self._queue.task_done()

    def _disk_error(self, e: OSError) -> None:
        if not self._warned:
            full = e.errno in (errno.ENOSPC, errno.EDQUOT)
            log.warning("prompt-cache disk tier: %s (%s); serving continues from memory",
                        "the disk is full" if full else "cannot write blocks", e)
            self._warned = True

    def _write_block(self, i: int, h: str, arrays, tokens) -> None:
        b0, b1 = i * self.block_tokens, (i + 1) * self.block_tokens
        entries, blobs, offset, crc = [], [], 0, 0
        for layer, parts in enumerate(arrays):
            for j, (arr, tag) in enumerate(parts):
                data = np.ascontiguousarray(arr[..., b0:b1, :])
                raw = memoryview(data).cast("B")
                shape = data.shape
                entries.append((f"{layer}.{j}", tag, shape, offset, offset + len(raw)))
                offset += len(raw)
                crc = zlib.crc32(raw, crc)
                blobs.append(raw)
        meta = {"format": FORMAT, "store": self.key, "chain": h, "index": str(i),
                "tokens": ",".join(map(str, tokens[b0:b1])), "crc32": str(crc)}
        header = encode_header(entries, meta)
        final = self.path(i, h)
        tmp = self.dir / f".{final.name}.{os.getpid()}.{threading.get_ident()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(length_prefix(header) + header)
                for raw in blobs:
                    f.write(raw)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        size = 8 + len(header) + offset
        self.bytes_written += size
        self.budget.add(size, keep=final)

    # -- reading -------------------------------------------------------------------------
    def read(self, tokens: Sequence[int], n_blocks: int, capacity: int, threads: int = 8):
        """The first `n_blocks` blocks of `tokens` as one numpy array per layer and part,
        [..., capacity, :] (tokens past n_blocks * block_tokens are zeros), and how many
        blocks were whole and right: a bad block is removed and ends the prefix there."""
        chain = self.chain(tokens)[:n_blocks]
        if not chain:
            return [], 0
        try:
            first = self._open(0, chain[0], tokens)
        except (OSError, CheckpointError, ValueError) as e:
            self._drop(0, chain[0], e)
            return [], 0
        dest = [[np.zeros((*shape[:2], capacity, *shape[3:]), DTYPES[tag].numpy) for tag, shape in layer]
                for layer in first]

        def one(i: int) -> bool:
            try:
                self._read_block(i, chain[i], tokens, dest)
                return True
            except (OSError, CheckpointError, ValueError) as e:
                self._drop(i, chain[i], e)
                return False

        with ThreadPoolExecutor(max_workers=threads) as pool:
            ok = list(pool.map(one, range(len(chain))))
        good = ok.index(False) if False in ok else len(ok)
        return [[(a, tag) for a, (tag, _) in zip(arrs, layer)] for arrs, layer in zip(dest, first)], good

    def _open(self, i: int, h: str, tokens) -> List[List[Tuple[str, tuple]]]:
        """Block i's layout ([(tag, shape)] per layer), after checking its header."""
        return _layout(self._check_header(self.path(i, h), i, h, tokens)[1])

    def _check_header(self, path: Path, i: int, h: str, tokens):
        meta, tensors = file_tensors(path)
        b0, b1 = i * self.block_tokens, (i + 1) * self.block_tokens
        want = {"format": FORMAT, "store": self.key, "chain": h, "index": str(i),
                "tokens": ",".join(map(str, tokens[b0:b1]))}
        for k, v in want.items():
            if meta.get(k) != v:
                raise ValueError(f"{path.name}: {k} does not match this store")
        return meta, tensors

    def _read_block(self, i: int, h: str, tokens, dest) -> None:
        path = self.path(i, h)
        meta, tensors = self._check_header(path, i, h, tokens)
        if _layout(tensors) != [[(tag_np(d), (*d.shape[:2], self.block_tokens, *d.shape[3:])) for d in layer]
                                for layer in dest]:
            raise ValueError(f"{path.name}: its tensors do not fit this model's caches")
        b0, b1 = i * self.block_tokens, (i + 1) * self.block_tokens
        # Read each tensor's rows straight into their place in `dest` (per leading index the
        # block's rows are one contiguous run there, as in the file): no staging copy.
        views, expect = [], min(t.offset for t in tensors.values())
        for layer, parts in enumerate(dest):
            for j, d in enumerate(parts):
                t = tensors[f"{layer}.{j}"]
                if t.offset != expect:
                    raise ValueError(f"{path.name}: tensors out of order")
                expect += t.nbytes
                views += [memoryview(d[lead][b0:b1]).cast("B") for lead in np.ndindex(*d.shape[:2])]
        crc, start = 0, min(t.offset for t in tensors.values())
        with open(path, "rb", buffering=0) as f:
            f.seek(start)
            for v in views:
                if f.readinto(v) != len(v):
                    raise ValueError(f"{path.name}: truncated")
                crc = zlib.crc32(v, crc)
        if str(crc) != meta.get("crc32"):
            raise ValueError(f"{path.name}: checksum mismatch (corrupt)")
        self.bytes_read += path.stat().st_size
        now = time.time()
        try:
            os.utime(path, (now, now))  # least recently used: a read counts as a use
        except OSError:
            pass

    def _drop(self, i: int, h: str, why: Exception) -> None:
        path = self.path(i, h)
        if path.exists():
            log.warning("prompt-cache disk tier: %s is unusable (%s): removed, its tokens recomputed", path.name, why)
            path.unlink(missing_ok=True)


def tag_np(arr: np.ndarray) -> str:
    return {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.uint16): "BF16",
            np.dtype(np.uint32): "U32", np.dtype(np.uint8): "U8", np.dtype(np.int32): "I32"}[arr.dtype]


def _layout(tensors: Dict[str, StoredTensor]) -> List[List[Tuple[str, tuple]]]:
    layers: Dict[int, Dict[int, Tuple[str, tuple]]] = {}
    for name, t in tensors.items():
        layer, _, part = name.partition(".")
        layers.setdefault(int(layer), {})[int(part)] = (t.tag, tuple(t.shape))
    if sorted(layers) != list(range(len(layers))):
        raise ValueError("layers missing from the block")
    return [[parts[j] for j in sorted(parts)] for _, parts in sorted(layers.items())]


def _host_views(buffers: List[List[mx.array]]):
    """numpy views (no copy) of the cache buffers, with their safetensors tags; bfloat16,
    which numpy lacks, is viewed as uint16 (a view of a whole buffer copies nothing)."""
    views = [[b.view(mx.uint16) if b.dtype == mx.bfloat16 else b for b in layer] for layer in buffers]
    mx.eval(views)
    return [[(np.asarray(memoryview(v)), tag_of(b.dtype)) for v, b in zip(vl, bl)]
            for vl, bl in zip(views, buffers)]


def model_identity(path: Path) -> str:
    """The model's files, cheaply: config.json, and each weight file's name, size and first
    and last MiB (weights of another model differ there as well as in the config)."""
    h = hashlib.sha256()
    path = Path(path)
    h.update((path / "config.json").read_bytes() if (path / "config.json").exists() else b"")
    for f in sorted(path.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()
