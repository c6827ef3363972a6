"""Prompt caches in two tiers: memory (bounded in bytes) and disk (survives restarts).

`TieredPromptCache` is mlx-lm's `LRUPromptCache` (the server's prefix reuse, the same
`fetch_nearest_cache` / `insert_cache` contract, so mlx-lm's one-at-a-time and batched
paths both use it) with:

- a byte bound on the memory tier, enforced on every insert (mlx-lm applies its
  `--prompt-cache-bytes` only on the batched path, and by default sets none);
- a disk tier (block_store.BlockStore) when given a directory: every cache inserted is
  also written there as blocks of `block_tokens` tokens, off the token path; a fetch whose
  stored prefix on disk is longer than the best one in memory restores it from disk. So a
  restart, a reload or an eviction from memory costs a read, not a prefill;
- under --kv-bits, a miss is a quantized cache from the first token (Model.make_cache),
  which merges into a batch;
- under mlx.launch every rank keeps its own blocks (the identity names the rank) and the
  ranks agree on the prefix restored, so they stay in lockstep even if one rank's
  directory lost a block;
- per fetch, how many tokens came from memory and from disk (`last_fetch`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import mlx.core as mx
from mlx_lm.models.cache import LRUPromptCache, trim_prompt_cache

from ..io.dtypes import DTYPES
from ..model import cache_blocks
from ..sizes import KV_CACHE_STEP, ceil_div
from .block_store import FORMAT, BlockStore, DiskBudget, model_identity

DEFAULT_BLOCK_TOKENS = 256
DEFAULT_DISK_BYTES = 64 * 10**9
log = logging.getLogger(__name__)


@dataclass
class FetchSource:
    """Where a fetched prompt's cached tokens came from."""

    memory: int = 0
    disk: int = 0
    disk_bytes: int = 0  # read to restore them
    disk_seconds: float = 0.0


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("minimax-m3-mlx")
    except Exception:  # not installed (a source checkout on the path)
        return "unknown"


class TieredPromptCache(LRUPromptCache):
    """mlx-lm's LRU prompt cache with a byte bound and an optional disk tier.

    `attach(model, model_path)` binds it to a loaded model (the disk tier needs the model's
    identity and cache kinds); until then it is mlx-lm's memory cache alone.
    """

    def __init__(self, max_size: int = 10, max_bytes: Optional[int] = None, directory: Optional[str] = None,
                 disk_bytes: int = DEFAULT_DISK_BYTES, block_tokens: int = DEFAULT_BLOCK_TOKENS):
        super().__init__(max_size, max_bytes if max_bytes is not None else 1 << 63)
        self.directory = Path(directory).expanduser() if directory else None
        self.disk_bytes, self.block_tokens = disk_bytes, block_tokens
        self.store: Optional[BlockStore] = None
        self.make_cache: Optional[Callable[[], list]] = None
        self.kv_bits = None
        self.group = None
        self.last_fetch: "OrderedDict[tuple, FetchSource]" = OrderedDict()
        self.reasoning = None  # reasoning_memory.ReasoningMemory, where the server keeps one
        self.budget: Optional[DiskBudget] = None
        self._lock = threading.Lock()
        if self.directory is not None:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.budget = DiskBudget(self.directory, disk_bytes)

    # -- binding -----------------------------------------------------------------------------
    def attach(self, model, model_path, kv_bits: Optional[int] = None, kv_group_size: int = 64,
               group=None) -> None:
        """Bind to `model` (loaded from `model_path`); caches are made as the server makes
        them (quantized from the first token under `kv_bits`). `group`: mx.distributed
        group under mlx.launch (the ranks agree on what they restore)."""
        self.kv_bits, self.group = kv_bits, group if group is not None and group.size() > 1 else None
        self.make_cache = lambda: model.make_cache(kv_bits=kv_bits, kv_group_size=kv_group_size)
        if self.directory is None:
            return
        block = model.args.index_block_size
        self.block_tokens = ceil_div(self.block_tokens, block) * block  # whole MSA blocks
        self.store = BlockStore(self.directory, self._identity(model, model_path, kv_bits, kv_group_size),
                                self.block_tokens, self.budget)

    def _identity(self, model, model_path, kv_bits, kv_group_size) -> dict:
        world = mx.distributed.init()
        caches = [(type(c).__name__, getattr(c, "index_dtype", None), getattr(c, "index_bits", None),
                   getattr(c, "block_size", None)) for c in model.make_cache(kv_bits=kv_bits, kv_group_size=kv_group_size)]
        tensor = getattr(model, "tensor_group", None)
        return {
            "format": FORMAT, "package": _package_version(), "model": model_identity(model_path),
            "kv_bits": kv_bits, "kv_group_size": kv_group_size, "caches": caches,
            "block_tokens": self.block_tokens, "rank": world.rank(), "world": world.size(),
            "tensor": tensor.size() if tensor is not None else 1,
            "first_layer": getattr(model.language_model.model, "layer_offset", 0),
        }

    # -- fetch -------------------------------------------------------------------------------
    def fetch_nearest_cache(self, model_key, tokens: List[int]):
        cache, rest = super().fetch_nearest_cache(model_key, tokens)
        source = FetchSource(memory=len(tokens) - len(rest))
        if self.store is not None:
            t0, read0 = time.perf_counter(), self.store.bytes_read
            restored = self._from_disk(tokens, source.memory)
            if restored is not None:
                cache, n = restored
                rest = tokens[n:]
                source = FetchSource(disk=n, disk_bytes=self.store.bytes_read - read0,
                                     disk_seconds=time.perf_counter() - t0)
        if cache is None and self.kv_bits is not None and self.make_cache is not None:
            # mlx-lm's server would make plain caches and quantize them later, one request at a time.
            cache = self.make_cache()
        self._record(tokens, source)
        return cache, rest

    def _from_disk(self, tokens: Sequence[int], in_memory: int) -> Optional[Tuple[list, int]]:
        """(caches, tokens restored) when the disk holds a longer prefix than memory."""
        B = self.block_tokens
        stored = self._agree(self.store.stored_blocks(tokens))
        if min(stored * B, len(tokens) - 1) <= in_memory:
            return None
        caches, got = self._read(tokens, stored)
        got = self._agree(got)  # every rank restores what all of them could read
        usable = min(got * B, len(tokens) - 1)
        if usable <= in_memory:
            return None
        trim_prompt_cache(caches, got * B - usable)  # the last prompt token is always fed
        return caches, usable

    def _read(self, tokens: Sequence[int], n_blocks: int) -> Tuple[Optional[list], int]:
        template = self.make_cache()
        n = n_blocks * self.block_tokens
        step = math.lcm(KV_CACHE_STEP, *(getattr(c, "step", KV_CACHE_STEP) for c in template))
        arrays, got = self.store.read(list(tokens), n_blocks, ceil_div(n, step) * step)
        if got and len(arrays) != len(template):
            log.warning("prompt-cache disk tier: blocks hold %d layers, the model %d; ignored",
                        len(arrays), len(template))
            got = 0
        if not got:
            return None, 0
        caches = [cache_blocks.restore(t, [_to_mx(a, tag) for a, tag in layer], got * self.block_tokens)
                  for t, layer in zip(template, arrays)]
        return caches, got

    def _agree(self, n: int) -> int:
        """The smallest `n` over the ranks (the ranks' directories may differ)."""
        if self.group is None:
            return n
        return int(mx.distributed.all_gather(mx.array([n], dtype=mx.int32), group=self.group).min().item())

    def _record(self, tokens: Sequence[int], source: FetchSource) -> None:
        with self._lock:
            self.last_fetch[_key(tokens)] = source
            while len(self.last_fetch) > 64:
                self.last_fetch.popitem(last=False)

    def source_of(self, tokens: Sequence[int]) -> Optional[FetchSource]:
        """Where the last fetch of `tokens` found its cached tokens (None: not fetched lately)."""
        with self._lock:
            return self.last_fetch.pop(_key(tokens), None)

    # -- insert ------------------------------------------------------------------------------
    def insert_cache(self, model_key, tokens: List[int], prompt_cache: List, *, cache_type: str = "assistant"):
        if self.store is not None:
            self._save(tokens, prompt_cache)
        super().insert_cache(model_key, tokens, prompt_cache, cache_type=cache_type)

    def _save(self, tokens: Sequence[int], caches: list) -> None:
        if any(cache_blocks.kind(c) is None for c in caches):
            return  # e.g. mlx-lm's QuantizedKVCache after --quantized-kv-start: memory only
        pairs = [cache_blocks.token_buffers(c) for c in caches]
        offsets = {off for _, off in pairs}
        if len(offsets) != 1:
            return
        offset = min(offsets.pop(), len(tokens))
        if offset >= self.block_tokens:
            self.store.save(list(tokens), [bufs for bufs, _ in pairs], offset)

    def flush(self) -> None:
        """Wait for the disk tier's writes (tests; before a planned restart)."""
        if self.store is not None:
            self.store.flush()

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


def _key(tokens: Sequence[int]) -> tuple:
    return (len(tokens), hash(tuple(tokens)))


def _to_mx(arr, tag: str) -> mx.array:
    a = mx.array(arr)
    return a if a.dtype == DTYPES[tag].mlx else a.view(DTYPES[tag].mlx)
