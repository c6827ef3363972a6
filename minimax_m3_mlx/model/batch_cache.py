"""BatchSparseCache: the MSA layers' cache for several sequences decoded together.

mlx-lm's BatchGenerator carries one batch cache per layer and calls merge, extend,
filter, extract, prepare/finalize on it as requests join and finish. Full-attention
layers use mlx-lm's BatchKVCache (left padding). The sparse layers cannot: their blocks
are anchored at absolute positions (slot // block_size), and left padding shifts each
sequence's slots by its own amount, so a sequence's blocks would straddle two of its
blocks as it would have them alone, and another sequence's padding would sit in them.

Here every sequence keeps its token at position p in slot p of its row, as it would
alone: no padding on the left, rows simply end at different lengths. Blocks then are
the same slots as in a single-sequence SparseKVCache, and selection is computed per row
exactly as alone; a row's unused tail is future to all of its queries and masked. The
price is that one token's write lands at a different slot per row (a scatter), which at
one token per row is nothing next to the step.

Quantized (`--kv-bits`): the rows of kvquant.QuantizedSparseKVCaches, K and V as
(words, scales, biases) and the index keys quantized or plain as `index_bits` says;
every buffer operation below runs on each part. mlx-lm has no quantized batch cache (its
server stops batching under --kv-bits); full-attention layers then take this class too,
without index keys, since mlx-lm's BatchKVCache cannot hold quantized rows.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import mlx.core as mx

from ..sizes import cache_step, ceil_div
from .cache import SparseKVCache
from .kvquant import KV_BITS, QuantizedSparseKVCache


def _each(buf, fn):
    """fn over a buffer's parts: a plain array, or a quantized (words, scales, biases)."""
    if buf is None:
        return None
    return tuple(fn(p) for p in buf) if isinstance(buf, tuple) else fn(buf)


def _capacity(buf) -> int:
    return (buf[0] if isinstance(buf, tuple) else buf).shape[2]


class BatchSparseCache:
    def __init__(self, lengths: List[int], block_size: int = 128, index_dtype: Optional[str] = None,
                 index_bits: Optional[int] = None, kv_quant: Optional[Tuple[int, int]] = None):
        self.block_size = block_size
        self.step = cache_step(block_size)
        self.index_dtype = index_dtype
        self.index_bits = index_bits
        self.kv_quant = None if kv_quant is None else tuple(kv_quant)
        self.keys = self.values = self.index_keys = None
        self.lengths = [int(n) for n in lengths]  # host copy: no device sync to plan writes
        self.offset = mx.array(self.lengths, dtype=mx.int32)
        self._right_padding: Optional[List[int]] = None

    @property
    def index_quant(self) -> Optional[Tuple[int, int]]:
        if self.kv_quant is not None and self.index_bits in KV_BITS:
            return self.kv_quant[0], self.index_bits
        return None

    # -- writes ------------------------------------------------------------------------------
    def _room(self, buf, needed: int, like: mx.array):
        if buf is not None and needed <= buf.shape[2]:
            return buf
        n = ceil_div(needed, self.step) * self.step
        new = mx.zeros((like.shape[0], like.shape[1], n, like.shape[3]), like.dtype)
        if buf is not None:
            new[..., : buf.shape[2], :] = buf
        return new

    def _write_part(self, buf, new: mx.array):
        """Write new [B, H, L, d] at each row's own offset."""
        L = new.shape[2]
        buf = self._room(buf, max(self.lengths) + L, new)
        first = self.lengths[0]
        if all(n == first for n in self.lengths):
            buf[..., first : first + L, :] = new
        elif L == 1:
            rows = mx.arange(len(self.lengths))[:, None]
            heads = mx.arange(buf.shape[1])[None, :]
            buf[rows, heads, self.offset[:, None]] = new[:, :, 0, :]
        else:  # a prefill chunk of rows at different lengths: one slice per row
            for b, n in enumerate(self.lengths):
                buf[b : b + 1, :, n : n + L, :] = new[b : b + 1]
        return buf

    def _write(self, buf, new: mx.array, quant: Optional[Tuple[int, int]]):
        if quant is None:
            return self._write_part(buf, new)
        parts = mx.quantize(new, group_size=quant[0], bits=quant[1])
        return tuple(self._write_part(b, p) for b, p in zip(buf or (None,) * 3, parts))

    def update_index(self, index_keys: mx.array):
        """Append index keys [B, 1, L, D] at each row's offset (call before update_and_fetch)."""
        if self.index_quant is None and self.index_dtype is not None:
            index_keys = index_keys.astype(getattr(mx, self.index_dtype))
        self.index_keys = self._write(self.index_keys, index_keys, self.index_quant)
        return self.index_keys

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Append K/V at each row's offset and advance the offsets; returns the whole buffers."""
        self.keys = self._write(self.keys, keys, self.kv_quant)
        self.values = self._write(self.values, values, self.kv_quant)
        L = keys.shape[2]
        self.lengths = [n + L for n in self.lengths]
        self.offset = self.offset + L
        return self.keys, self.values

    # -- mlx-lm's BatchGenerator protocol --------------------------------------------------------
    def prepare(self, *, left_padding=None, lengths=None, right_padding=None):
        """Right padding (a prompt chunk of unequal lengths) is undone by finalize; left
        padding has no meaning here (rows start at slot 0) and is accepted only when zero."""
        if left_padding is not None and any(left_padding):
            raise ValueError("BatchSparseCache keeps each sequence from slot 0: no left padding")
        if right_padding is not None and max(right_padding) > 0:
            self._right_padding = [int(p) for p in right_padding]

    def finalize(self):
        """After a right-padded chunk: each row ends at its real length; the padding tokens
        written past it are future to every later query and overwritten as the row grows."""
        if self._right_padding is not None:
            self.lengths = [n - p for n, p in zip(self.lengths, self._right_padding)]
            self.offset = mx.array(self.lengths, dtype=mx.int32)
            self._right_padding = None

    def filter(self, batch_indices):
        idx = [int(i) for i in (batch_indices.tolist() if isinstance(batch_indices, mx.array) else batch_indices)]
        sel = mx.array(idx, dtype=mx.int32)
        self.lengths = [self.lengths[i] for i in idx]
        self.offset = mx.array(self.lengths, dtype=mx.int32)
        if self.keys is None:
            return
        # Drop capacity that no remaining row needs.
        n = ceil_div(max(max(self.lengths, default=0), 1), self.step) * self.step
        self.keys, self.values, self.index_keys = (
            _each(b, lambda p: p[sel, :, :n]) for b in (self.keys, self.values, self.index_keys))

    def extend(self, other: "BatchSparseCache"):
        """Append other's rows (in place)."""
        if other.keys is not None or self.keys is not None:
            ref = self if self.keys is not None else other
            n = max(_capacity(c.keys) for c in (self, other) if c.keys is not None)
            bufs = []
            for name in ("keys", "values", "index_keys"):
                like = getattr(ref, name)
                if like is None and getattr(other, name) is None:
                    bufs.append(None)
                    continue
                like = like if like is not None else getattr(other, name)
                mine = self._sized(getattr(self, name), n, like, len(self.lengths))
                theirs = self._sized(getattr(other, name), n, like, len(other.lengths))
                bufs.append(tuple(mx.concatenate(pair, axis=0) for pair in zip(mine, theirs))
                            if isinstance(like, tuple) else mx.concatenate([mine, theirs], axis=0))
            self.keys, self.values, self.index_keys = bufs
        self.lengths = self.lengths + other.lengths
        self.offset = mx.array(self.lengths, dtype=mx.int32)

    @staticmethod
    def _sized(buf, n: int, like, rows: int):
        """buf with n slots (zeros past its own), or rows of zeros shaped like `like`."""
        if isinstance(like, tuple):
            return tuple(BatchSparseCache._sized(b, n, p, rows) for b, p in zip(buf or (None,) * len(like), like))
        if buf is None:
            return mx.zeros((rows, like.shape[1], n, like.shape[3]), like.dtype)
        if buf.shape[2] < n:
            pad = mx.zeros((rows, buf.shape[1], n - buf.shape[2], buf.shape[3]), buf.dtype)
            return mx.concatenate([buf, pad], axis=2)
        return buf

    def extract(self, idx: int):
        """Row idx as the single-sequence cache it would be alone."""
        n = self.lengths[idx]
        filled = self.keys is not None and n > 0
        row = (lambda b: _each(b, lambda p: mx.contiguous(p[idx : idx + 1, :, :n]))) if filled else (lambda b: None)
        if self.kv_quant is not None:
            gs, bits = self.kv_quant
            c = QuantizedSparseKVCache(self.block_size, gs, bits, self.index_bits)
            c.state = (row(self.keys), row(self.values), row(self.index_keys), n if filled else 0,
                       self.block_size, gs, bits, self.index_bits)
            return c
        c = SparseKVCache(self.block_size, self.index_dtype, self.index_bits)
        if filled:
            c.state = (row(self.keys), row(self.values), row(self.index_keys), n, self.block_size,
                       self.index_dtype or "")
        return c

    @classmethod
    def merge(cls, caches: List) -> "BatchSparseCache":
        """One row per single-sequence cache, each from slot 0 (no padding). Quantized caches
        (kvquant.QuantizedSparseKVCache) make a quantized batch; a plain cache among them
        is quantized the same way first (mlx-lm's to_quantized)."""
        quantized = next((c for c in caches if isinstance(c, QuantizedSparseKVCache)), None)
        if quantized is not None:
            caches = [c if isinstance(c, QuantizedSparseKVCache) else c.to_quantized(*quantized.kv_quant)
                      for c in caches]
            first = quantized
            out = cls([c.offset for c in caches], first.block_size, None, first.index_bits, first.kv_quant)
        else:
            first = caches[0]
            out = cls([c.offset for c in caches], first.block_size, first.index_dtype,
                      getattr(first, "index_bits", None))
        filled = [c for c in caches if c.keys is not None and c.offset > 0]
        if not filled:
            return out
        n = ceil_div(max(out.lengths), out.step) * out.step
        B = len(caches)
        for name in ("keys", "values", "index_keys"):
            like = next((getattr(c, name) for c in filled if getattr(c, name) is not None), None)
            if like is None:
                continue
            buf = _each(like, lambda p: mx.zeros((B, p.shape[1], n, p.shape[3]), p.dtype))
            for b, c in enumerate(caches):
                src = getattr(c, name)
                if src is None or c.offset == 0:
                    continue
                for dst_part, src_part in zip(buf if isinstance(buf, tuple) else (buf,),
                                              src if isinstance(src, tuple) else (src,)):
                    dst_part[b : b + 1, :, : c.offset] = src_part[..., : c.offset, :]
            setattr(out, name, buf)
        return out

    # -- bookkeeping mlx-lm reads ----------------------------------------------------------------
    @property
    def state(self):
        return self.keys, self.values, self.index_keys, self.offset

    @state.setter
    def state(self, v):
        self.keys, self.values, self.index_keys, self.offset = v
        self.lengths = [int(n) for n in self.offset.tolist()]

    def size(self) -> int:
        return max(self.lengths, default=0)

    def empty(self) -> bool:
        return self.keys is None

    def is_trimmable(self) -> bool:
        return False

    @property
    def nbytes(self) -> int:
        parts = []
        for b in (self.keys, self.values, self.index_keys):
            parts += list(b) if isinstance(b, tuple) else [b] if b is not None else []
        return sum(p.nbytes for p in parts)


SparseKVCache.batch_class = BatchSparseCache
QuantizedSparseKVCache.batch_class = BatchSparseCache
