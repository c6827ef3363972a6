"""KV caches: mlx-lm's KVCache for full-attention layers, SparseKVCache for MSA layers.

SparseKVCache keeps the main branch's keys/values and the index branch's keys in one
object with one offset, so trimming, saving and loading can never let them drift apart
(mlx-lm's port keeps them in a CacheList of two KVCaches). Its buffers are allocated in
whole blocks so that the sparse main branch can address the keys as rows of whole blocks
and gather the selected ones without first copying any part of the cache.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx_lm.models.cache as _mlx_lm_cache
from mlx_lm.models.cache import KVCache

from ..sizes import cache_step, ceil_div


class SparseKVCache(KVCache):
    # Full precision: the attention reads the buffers as they are (see kvquant).
    kv_quant = index_quant = None

    def __init__(self, block_size: int = 128, index_dtype: Optional[str] = None,
                 index_bits: Optional[int] = None):
        super().__init__()
        self.block_size = block_size
        # Allocation granularity: whole blocks, at least mlx-lm's 256 tokens.
        self.step = cache_step(block_size)
        self.index_keys = None
        # A name ("float32"), not an mx.Dtype: mlx-lm's server deep-copies caches, and
        # an mx.Dtype cannot be copied. None keeps the model's dtype.
        self.index_dtype = index_dtype
        # Index-key bits once quantized (to_quantized); None: kvquant.DEFAULT_INDEX_BITS.
        self.index_bits = index_bits

    # -- writes ----------------------------------------------------------------------
    def _grow(self, arr, needed: int, like: mx.array):
        """Return `arr` with room for `needed` slots (whole steps), keeping its first `self.offset`."""
        if arr is not None and needed <= arr.shape[2]:
            return arr
        n = ceil_div(needed, self.step) * self.step
        shape = (like.shape[0], like.shape[1], n, like.shape[3])
        new = mx.zeros(shape, like.dtype)
        if arr is not None and self.offset > 0:
            new[..., : self.offset, :] = arr[..., : self.offset, :]
        return new

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Append main-branch keys/values; returns the valid part, like KVCache.

        Call update_index first for the same tokens when the layer is sparse: the offset
        advances here.
        """
        prev, needed = self.offset, self.offset + keys.shape[2]
        self.keys = self._grow(self.keys, needed, keys)
        self.values = self._grow(self.values, needed, values)
        self.keys[..., prev:needed, :] = keys
        self.values[..., prev:needed, :] = values
        self.offset = needed
        return self.keys[..., :needed, :], self.values[..., :needed, :]

    def update_index(self, index_keys: mx.array) -> mx.array:
        """Append index keys [B, 1, L, D] at the current offset; returns the whole buffer.

        The buffer is returned unsliced (capacity >= offset + L, whole blocks): callers mask
        slots past each query's position, which covers the unwritten tail.
        """
        if self.index_dtype is not None:
            index_keys = index_keys.astype(getattr(mx, self.index_dtype))
        prev, needed = self.offset, self.offset + index_keys.shape[2]
        self.index_keys = self._grow(self.index_keys, needed, index_keys)
        self.index_keys[..., prev:needed, :] = index_keys
        return self.index_keys

    # -- state (save/load/trim) --------------------------------------------------------
    @property
    def state(self):
        index_dtype = self.index_dtype or ""
        if self.keys is None:
            return None, None, None, 0, self.block_size, index_dtype
        n = self.offset
        return (
            self.keys[..., :n, :],
            self.values[..., :n, :],
            self.index_keys[..., :n, :] if self.index_keys is not None else None,
            n,
            self.block_size,
            index_dtype,
        )

    @state.setter
    def state(self, v):
        self.keys, self.values, self.index_keys, self.offset, self.block_size, index_dtype = v
        self.offset, self.block_size = int(self.offset), int(self.block_size)
        self.index_dtype = index_dtype or None
        self.step = cache_step(self.block_size)
        if self.keys is not None:
            # Loaded arrays are exactly `offset` long; re-pad to whole blocks.
            self.keys = self._pad(self.keys)
            self.values = self._pad(self.values)
            if self.index_keys is not None:
                self.index_keys = self._pad(self.index_keys)

    def _pad(self, arr: mx.array) -> mx.array:
        n = ceil_div(max(arr.shape[2], 1), self.step) * self.step
        if n == arr.shape[2]:
            return arr
        pad = mx.zeros((*arr.shape[:2], n - arr.shape[2], arr.shape[3]), arr.dtype)
        return mx.concatenate([arr, pad], axis=2)

    @classmethod
    def from_state(cls, state):
        obj = cls.__new__(cls)
        obj.state = state
        return obj

    # The batch cache merge() makes: batch_cache.BatchSparseCache, which sets itself here
    # (it builds on this module, so this module cannot import it).
    batch_class = None

    @classmethod
    def merge(cls, caches):
        """mlx-lm's batched generation merges per-request caches: into a BatchSparseCache,
        which keeps the index keys and each sequence's blocks where they are alone
        (KVCache.merge would give a BatchKVCache without them)."""
        if cls.batch_class is None:
            raise ValueError("import minimax_m3_mlx.model.batch_cache before batching SparseKVCaches")
        return cls.batch_class.merge(caches)

    def to_quantized(self, group_size: int = 64, bits: int = 4):
        """The quantized sparse cache (K/V and index keys; mlx-lm's QuantizedKVCache would
        drop the index keys). Called by mlx-lm's maybe_quantize_kv_cache for --kv-bits."""
        from .kvquant import DEFAULT_INDEX_BITS, QuantizedSparseKVCache

        index_bits = getattr(self, "index_bits", None) or DEFAULT_INDEX_BITS
        return QuantizedSparseKVCache.from_sparse(self, group_size, bits, index_bits)

    @property
    def nbytes(self):
        if self.keys is None:
            return 0
        extra = self.index_keys.nbytes if self.index_keys is not None else 0
        return self.keys.nbytes + self.values.nbytes + extra


# mlx-lm's load_prompt_cache finds cache classes by name in its own module, so a cache
# saved with save_prompt_cache can only be loaded back if the class is visible there.
_mlx_lm_cache.SparseKVCache = SparseKVCache
