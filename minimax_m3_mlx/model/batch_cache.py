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
"""

from __future__ import annotations

from typing import List, Optional

import mlx.core as mx

from ..sizes import cache_step, ceil_div
from .cache import SparseKVCache


class BatchSparseCache:
    def __init__(self, lengths: List[int], block_size: int = 128, index_dtype: Optional[str] = None):
        self.block_size = block_size
        self.step = cache_step(block_size)
        self.index_dtype = index_dtype
        self.keys = self.values = self.index_keys = None
        self.lengths = [int(n) for n in lengths]  # host copy: no device sync to plan writes
        self.offset = mx.array(self.lengths, dtype=mx.int32)
        self._right_padding: Optional[List[int]] = None

    # -- writes ------------------------------------------------------------------------------
    def _room(self, buf, needed: int, like: mx.array):
        if buf is not None and needed <= buf.shape[2]:
            return buf
        n = ceil_div(needed, self.step) * self.step
        new = mx.zeros((like.shape[0], like.shape[1], n, like.shape[3]), like.dtype)
        if buf is not None:
            new[..., : buf.shape[2], :] = buf
        return new

    def _write(self, buf, new: mx.array):
        """Write new [B, H, L, D] at each row's own offset."""
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

    def update_index(self, index_keys: mx.array) -> mx.array:
        """Append index keys [B, 1, L, D] at each row's offset (call before update_and_fetch)."""
        if self.index_dtype is not None:
            index_keys = index_keys.astype(getattr(mx, self.index_dtype))
        self.index_keys = self._write(self.index_keys, index_keys)
        return self.index_keys

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Append K/V at each row's offset and advance the offsets; returns the whole buffers."""
        self.keys = self._write(self.keys, keys)
        self.values = self._write(self.values, values)
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
        self.keys, self.values = self.keys[sel, :, :n], self.values[sel, :, :n]
        if self.index_keys is not None:
            self.index_keys = self.index_keys[sel, :, :n]

    def extend(self, other: "BatchSparseCache"):
        """Append other's rows (in place)."""
        if other.keys is not None or self.keys is not None:
            n = max(b.shape[2] for b in (self.keys, other.keys) if b is not None)
            ref = self if self.keys is not None else other
            parts = [
                [c._sized(getattr(c, name), n, getattr(ref, name), len(c.lengths)) for c in (self, other)]
                for name in ("keys", "values", "index_keys")
            ]
            self.keys, self.values, self.index_keys = (mx.concatenate(p, axis=0) for p in parts)
        self.lengths = self.lengths + other.lengths
        self.offset = mx.array(self.lengths, dtype=mx.int32)

    @staticmethod
    def _sized(buf, n: int, like: mx.array, rows: int) -> mx.array:
        if buf is None:
            return mx.zeros((rows, like.shape[1], n, like.shape[3]), like.dtype)
        if buf.shape[2] < n:
            pad = mx.zeros((rows, buf.shape[1], n - buf.shape[2], buf.shape[3]), buf.dtype)
            return mx.concatenate([buf, pad], axis=2)
        return buf

    def extract(self, idx: int) -> SparseKVCache:
        """Row idx as the single-sequence cache it would be alone."""
        c = SparseKVCache(self.block_size, self.index_dtype)
        n = self.lengths[idx]
        if self.keys is not None and n > 0:
            c.state = (
                mx.contiguous(self.keys[idx : idx + 1, :, :n]),
                mx.contiguous(self.values[idx : idx + 1, :, :n]),
                mx.contiguous(self.index_keys[idx : idx + 1, :, :n]) if self.index_keys is not None else None,
                n, self.block_size, self.index_dtype or "",
            )
        return c

    @classmethod
    def merge(cls, caches: List[SparseKVCache]) -> "BatchSparseCache":
        """One row per single-sequence cache, each from slot 0 (no padding)."""
        first = caches[0]
        out = cls([c.offset for c in caches], first.block_size, first.index_dtype)
        filled = [c for c in caches if c.keys is not None and c.offset > 0]
        if not filled:
            return out
        n = ceil_div(max(out.lengths), out.step) * out.step
        B = len(caches)
        for name in ("keys", "values", "index_keys"):
            like = next((getattr(c, name) for c in filled if getattr(c, name) is not None), None)
            if like is None:
                continue
            buf = mx.zeros((B, like.shape[1], n, like.shape[3]), like.dtype)
            for b, c in enumerate(caches):
                src = getattr(c, name)
                if src is not None and c.offset > 0:
                    buf[b : b + 1, :, : c.offset] = src[..., : c.offset, :]
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
        return sum(b.nbytes for b in (self.keys, self.values, self.index_keys) if b is not None)


SparseKVCache.batch_class = BatchSparseCache
