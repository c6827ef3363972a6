"""Integer arithmetic shared across layers: rounding up, and the KV caches' allocation step.

The caches (model/cache.py) and the memory plan (parallel/sizing.py) both size buffers
with `cache_step`, so the plan's figures are what the caches allocate.
"""

from __future__ import annotations

from typing import Optional

# mlx-lm's KVCache grows its buffers by this many tokens.
KV_CACHE_STEP = 256


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def cache_step(block_size: Optional[int] = None) -> int:
    """Tokens per buffer growth: mlx-lm's 256, or for a sparse layer's cache whole index
    blocks of at least that many tokens (the sparse branch addresses whole blocks)."""
    if block_size is None:
        return KV_CACHE_STEP
    return block_size * max(1, ceil_div(KV_CACHE_STEP, block_size))
