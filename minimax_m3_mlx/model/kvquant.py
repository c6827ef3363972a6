"""Quantized caches on every layer, index keys included, through mlx-lm's `--kv-bits`.

mlx-lm's `maybe_quantize_kv_cache` calls `to_quantized(group_size, bits)` on each layer's
cache. Full-attention layers' KVCache become mlx-lm's own QuantizedKVCache; a sparse
layer's SparseKVCache becomes a QuantizedSparseKVCache: K and V as packed words, scales
and biases (mx.quantize's affine triple), still in whole blocks so that the sparse branch
gathers a selected block's rows of all three with one gather each; the index keys in
`index_bits` (8 by default: selection is the sensitive part), one offset for all.

Scoring stays float32: quantized index keys are dequantized to float32 tile by tile.
At decode the sparse branch attends with quantized matmuls over the gathered blocks' words
(SPARSE_ATTENTION = "matmul"); a prefill chunk, or SPARSE_ATTENTION = "dequantize",
dequantizes only the gathered blocks and runs SDPA. scripts/bench_msa.py --sparse-quant
measures the two (BENCHMARKS.md: on the H200 matmul is as fast or faster).
"""

from __future__ import annotations

from typing import Optional, Tuple

import mlx.core as mx
import mlx_lm.models.cache as _mlx_lm_cache
from mlx_lm.models.base import quantized_scaled_dot_product_attention
from mlx_lm.models.cache import QuantizedKVCache, _BaseCache

from ..sizes import cache_step, ceil_div
from . import msa

KV_BITS = (4, 8)
INDEX_BITS = (4, 8, 16, 32)
# Quantized K/V whatever the index keys: 8 bits is where selection stays put
# (BENCHMARKS.md has the selection-change rates at 8 and 4 bits).
DEFAULT_INDEX_BITS = 8
GROUP_SIZES = (32, 64, 128)
# "matmul": quantized matmuls over the gathered words (decode only).
# "dequantize": gather the selected blocks' words, dequantize them, mx.fast SDPA.
SPARSE_ATTENTION = "matmul"


def check_quantization(bits: int, group_size: int, dims=(), index_bits: Optional[int] = None) -> None:
    """One clear line for a setting no quantized cache can hold."""
    if bits not in KV_BITS:
        raise ValueError(f"--kv-bits {bits}: MiniMax-M3's quantized cache takes {' or '.join(map(str, KV_BITS))}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"--kv-group-size {group_size}: choose {', '.join(map(str, GROUP_SIZES))}")
    for name, d in dims:
        if d % group_size:
            fits = [g for g in GROUP_SIZES if all(x % g == 0 for _, x in dims)]
            hint = f": pass --kv-group-size {' or '.join(map(str, fits))}" if fits else ""
            raise ValueError(f"--kv-group-size {group_size} does not divide {name}={d}{hint}")
    if index_bits is not None and index_bits not in INDEX_BITS:
        raise ValueError(f"--index-bits {index_bits}: choose {', '.join(map(str, INDEX_BITS))}")


class QuantizedRows:
    """A [B, H, C, D] cache buffer held as (words, scales, biases): what the sparse branch
    and the index scoring address in place of a plain array."""

    def __init__(self, parts, group_size: int, bits: int):
        self.parts = tuple(parts)
        self.group_size, self.bits = group_size, bits
        w = self.parts[0]
        self.shape = (*w.shape[:-1], w.shape[-1] * 32 // bits)
        self.dtype = self.parts[1].dtype

    def gather_blocks(self, block_ids: mx.array, block_size: int) -> mx.array:
        w, s, b = (msa.gather_blocks(p, block_ids, block_size) for p in self.parts)
        return mx.dequantize(w, s, b, group_size=self.group_size, bits=self.bits)

    def gather_words(self, block_ids: mx.array, block_size: int):
        return tuple(msa.gather_blocks(p, block_ids, block_size) for p in self.parts)

    def rows(self, k0: int, k1: int, dtype=mx.float32) -> mx.array:
        w, s, b = (p[:, :, k0:k1, :] for p in self.parts)
        return mx.dequantize(w, s, b, group_size=self.group_size, bits=self.bits, dtype=dtype)


def as_rows(buf, quant: Optional[Tuple[int, int]]):
    """A cache buffer as the attention reads it: the array, or QuantizedRows of its parts."""
    return buf if quant is None else QuantizedRows(buf, *quant)


def _grow(arr: Optional[mx.array], needed: int, step: int, offset: int, like: mx.array) -> mx.array:
    """`arr` with room for `needed` slots (whole steps), keeping its first `offset`."""
    if arr is not None and needed <= arr.shape[2]:
        return arr
    n = ceil_div(needed, step) * step
    new = mx.zeros((*like.shape[:2], n, like.shape[3]), like.dtype)
    if arr is not None and offset > 0:
        new[..., :offset, :] = arr[..., :offset, :]
    return new


def _pad(arr: mx.array, step: int) -> mx.array:
    n = ceil_div(max(arr.shape[2], 1), step) * step
    if n == arr.shape[2]:
        return arr
    return mx.concatenate([arr, mx.zeros((*arr.shape[:2], n - arr.shape[2], arr.shape[3]), arr.dtype)], axis=2)


class QuantizedSparseKVCache(_BaseCache):
    """SparseKVCache's quantized counterpart: K/V (words, scales, biases) and index keys
    (quantized at index_bits 4 or 8; the model dtype at 16; float32 at 32), one offset."""

    def __init__(self, block_size: int = 128, group_size: int = 64, bits: int = 4,
                 index_bits: int = DEFAULT_INDEX_BITS):
        check_quantization(bits, group_size, index_bits=index_bits)
        self.block_size, self.group_size, self.bits, self.index_bits = block_size, group_size, bits, index_bits
        self.step = cache_step(block_size)
        self.keys = self.values = self.index_keys = None
        self.offset = 0

    @property
    def kv_quant(self) -> Tuple[int, int]:
        return self.group_size, self.bits

    @property
    def index_quant(self) -> Optional[Tuple[int, int]]:
        return (self.group_size, self.index_bits) if self.index_bits in KV_BITS else None

    def _quantize(self, x: mx.array, bits: int):
        if x.shape[-1] % self.group_size:
            raise ValueError(f"--kv-group-size {self.group_size} does not divide the head size {x.shape[-1]}")
        return tuple(mx.quantize(x, group_size=self.group_size, bits=bits))

    def _write(self, buf, new, prev: int, needed: int):
        buf = tuple(_grow(b, needed, self.step, prev, n) for b, n in zip(buf or (None,) * len(new), new))
        for b, n in zip(buf, new):
            b[..., prev:needed, :] = n
        return buf

    # -- writes (same contract as SparseKVCache) ---------------------------------------
    def update_index(self, index_keys: mx.array):
        """Append index keys at the current offset; returns the whole buffer (see SparseKVCache)."""
        prev, needed = self.offset, self.offset + index_keys.shape[2]
        if self.index_quant is not None:
            self.index_keys = self._write(self.index_keys, self._quantize(index_keys, self.index_bits), prev, needed)
            return QuantizedRows(self.index_keys, *self.index_quant)
        if self.index_bits == 32:
            index_keys = index_keys.astype(mx.float32)
        (self.index_keys,) = self._write((self.index_keys,) if self.index_keys is not None else None,
                                         (index_keys,), prev, needed)
        return self.index_keys

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Append K/V; returns the valid part as (words, scales, biases) pairs, like QuantizedKVCache."""
        prev, needed = self.offset, self.offset + keys.shape[2]
        self.keys = self._write(self.keys, self._quantize(keys, self.bits), prev, needed)
        self.values = self._write(self.values, self._quantize(values, self.bits), prev, needed)
        self.offset = needed
        cut = lambda t: tuple(p[..., :needed, :] for p in t)  # noqa: E731
        return cut(self.keys), cut(self.values)

    # -- state (save/load/trim) --------------------------------------------------------
    @property
    def state(self):
        meta = (self.offset, self.block_size, self.group_size, self.bits, self.index_bits)
        if self.keys is None:
            return (None, None, None, *meta)
        n = self.offset
        def cut(t):  # (no index keys on a full-attention layer)
            if t is None:
                return None
            return tuple(p[..., :n, :] for p in t) if isinstance(t, tuple) else t[..., :n, :]

        return (cut(self.keys), cut(self.values), cut(self.index_keys), *meta)

    @state.setter
    def state(self, v):
        keys, values, index_keys, offset, block_size, group_size, bits, index_bits = v
        self.offset, self.block_size, self.group_size = int(offset), int(block_size), int(group_size)
        self.bits, self.index_bits = int(bits), int(index_bits)
        self.step = cache_step(self.block_size)
        pad = lambda t: tuple(_pad(p, self.step) for p in t)  # noqa: E731
        # Loaded arrays are exactly `offset` long (and tuples come back as lists): re-pad to whole blocks.
        self.keys = pad(keys) if keys is not None else None
        self.values = pad(values) if values is not None else None
        if index_keys is None:
            self.index_keys = None
        elif isinstance(index_keys, (list, tuple)):
            self.index_keys = pad(index_keys)
        else:
            self.index_keys = _pad(index_keys, self.step)

    @classmethod
    def from_state(cls, state):
        obj = cls.__new__(cls)
        obj.state = state
        return obj

    @classmethod
    def from_sparse(cls, cache, group_size: int, bits: int, index_bits: int) -> "QuantizedSparseKVCache":
        """The quantized copy of a SparseKVCache (what SparseKVCache.to_quantized returns)."""
        obj = cls(cache.block_size, group_size, bits, index_bits)
        if cache.keys is None:
            return obj
        n = obj.offset = cache.offset
        obj.keys = tuple(_pad(p, obj.step) for p in obj._quantize(cache.keys[..., :n, :], bits))
        obj.values = tuple(_pad(p, obj.step) for p in obj._quantize(cache.values[..., :n, :], bits))
        if cache.index_keys is not None:
            # The index keys are model-dtype values (even when stored as float32): quantize
            # them from the model dtype, so scales and biases take its width.
            idx = cache.index_keys[..., :n, :]
            if obj.index_quant is not None:
                obj.index_keys = tuple(_pad(p, obj.step) for p in obj._quantize(idx.astype(cache.keys.dtype),
                                                                                 obj.index_bits))
            else:
                obj.index_keys = _pad(idx.astype(mx.float32 if index_bits == 32 else cache.keys.dtype), obj.step)
        return obj

    def is_trimmable(self):
        return True

    def trim(self, n):
        n = min(self.offset, n)
        self.offset -= n
        return n

    def empty(self):
        return self.keys is None

    def to_quantized(self, group_size: int = 64, bits: int = 4):
        if (group_size, bits) == (self.group_size, self.bits):
            return self
        raise ValueError(f"this cache is already quantized at {self.bits} bits, group size {self.group_size}")

    # The batch cache merge() makes: batch_cache.BatchSparseCache, which sets itself here
    # (it builds on this module).
    batch_class = None

    @classmethod
    def merge(cls, caches):
        """mlx-lm's batched generation merges per-request caches: into a quantized
        BatchSparseCache (mlx-lm's own QuantizedKVCache cannot be batched at all)."""
        if cls.batch_class is None:
            raise ValueError("import minimax_m3_mlx.model.batch_cache before batching quantized caches")
        return cls.batch_class.merge(caches)

    @property
    def nbytes(self):
        parts = [*(self.keys or ()), *(self.values or ())]
        idx = self.index_keys
        parts += list(idx) if isinstance(idx, tuple) else [idx] if idx is not None else []
        return sum(p.nbytes for p in parts)


def dense_attention(q, keys, values, scale: float, cache=None, mask=None):
    """Causal attention over the valid keys of any of the caches: [B, Hq, L, D] -> [B, L, Hq, D].

    Quantized keys: one query attends with mlx-lm's quantized matmuls ([Hq, S] scores);
    a prefill chunk dequantizes the layer's keys and runs mx.fast SDPA, whose memory
    stays bounded where mlx-lm's quantized attention would hold [Hq, L, S] scores.
    """
    plain = msa.dense_attention
    quant = getattr(cache, "kv_quant", None)
    if quant is None and isinstance(cache, QuantizedKVCache):
        quant = (cache.group_size, cache.bits)
    if quant is None:
        return plain(q, keys, values, scale, mask)
    gs, bits = quant
    if q.shape[2] == 1:
        keys, values, mask = _whole_buffers(keys, values, cache, mask)
        o = quantized_scaled_dot_product_attention(q, keys, values, scale=scale, mask=mask, group_size=gs, bits=bits)
        return o.transpose(0, 2, 1, 3)
    k = mx.dequantize(*keys, group_size=gs, bits=bits)
    v = mx.dequantize(*values, group_size=gs, bits=bits)
    return plain(q, k, v, scale, mask)


def _whole_buffers(keys, values, cache, mask):
    """The cache's whole quantized buffers in place of the first n slots, the slots past n
    masked: the same attention, but over contiguous operands, which MLX CUDA's quantized
    matmul requires (a slice of the slot axis is not contiguous: "No implementation for
    problem shape"); the capacity is at most one allocation step more than n."""
    whole_k, whole_v = getattr(cache, "keys", None), getattr(cache, "values", None)
    # (mlx-lm's QuantizedKVCache holds its triples as lists)
    if not isinstance(whole_k, (list, tuple)) or whole_k[0].shape[:2] != keys[0].shape[:2]:
        return keys, values, mask
    whole_k, whole_v = tuple(whole_k), tuple(whole_v)
    n, C = keys[0].shape[2], whole_k[0].shape[2]
    if C == n:
        return keys, values, mask
    if mask is None:
        mask = mx.arange(C) < n
    else:  # [.., L, n] -> [.., L, C]
        mask = mx.concatenate([mask, mx.zeros((*mask.shape[:-1], C - n), dtype=mx.bool_)], axis=-1)
    return whole_k, whole_v, mask


def decode_step(scale: float, block_size: int, topk: int, local_blocks: int, cache):
    """msa's compiled decode step for this cache: plain, or over its quantized triples."""
    if cache.kv_quant is None:
        return msa.compiled_decode_step(scale, block_size, topk, local_blocks)
    words = _words_attention(*cache.kv_quant) if SPARSE_ATTENTION == "matmul" else None
    return msa.compiled_decode_step(scale, block_size, topk, local_blocks, kv_quant=cache.kv_quant,
                                    index_quant=cache.index_quant, rows=as_rows, words_attention=words)


_WORDS_ATTENTION = {}


def _words_attention(group_size: int, bits: int):
    """The "matmul" variant for msa._decode_step: gather the selected blocks' words, then
    matmul_attention (one function per setting, so the compiled steps are shared)."""
    if (group_size, bits) not in _WORDS_ATTENTION:
        def attend(q, keys, values, ids, mask, scale, n_keys):
            B, Hkv, bs = q.shape[0], keys.shape[1], n_keys // ids.shape[-1]
            kw = tuple(p.reshape(B, Hkv, n_keys, -1) for p in keys.gather_words(ids, bs))
            vw = tuple(p.reshape(B, Hkv, n_keys, -1) for p in values.gather_words(ids, bs))
            return matmul_attention(q, kw, vw, mask, scale, group_size, bits)

        _WORDS_ATTENTION[(group_size, bits)] = attend
    return _WORDS_ATTENTION[(group_size, bits)]


def matmul_attention(q, kw, vw, mask, scale: float, group_size: int, bits: int):
    """Decode attention with quantized matmuls over gathered words (the "matmul" variant).

    q: [B, Hq, 1, D]; kw/vw: (words, scales, biases) of [B, Hkv, S, *]; mask: bool, [S] or
    per row and group [B, Hkv, 1, S].
    """
    B, Hq, _, D = q.shape
    Hkv = kw[0].shape[1]
    qg = (q * scale).reshape(B, Hkv, Hq // Hkv, D)
    s = mx.quantized_matmul(qg, *kw, transpose=True, group_size=group_size, bits=bits)
    s = mx.where(mask, s.astype(mx.float32), -mx.inf)
    p = mx.softmax(s, axis=-1).astype(q.dtype)
    o = mx.quantized_matmul(p, *vw, transpose=False, group_size=group_size, bits=bits)
    return o.reshape(B, Hq, 1, -1)


# mlx-lm's load_prompt_cache finds cache classes by name in its own module.
_mlx_lm_cache.QuantizedSparseKVCache = QuantizedSparseKVCache
