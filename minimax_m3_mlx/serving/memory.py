"""What the server may hold in memory: the prompt cache's default bound, and whether a
request's KV cache fits in what is left.

A Mac that runs out of memory swaps or kills the process; a prompt cache that grows with
every agent session, or one 1M-token request, must not be the cause. So the memory tier
is bounded by default (half of what the weights leave), and a request whose cache cannot
fit in the memory left (the prompt cache's entries count as free: they can be evicted)
is refused before it is queued.
"""

from __future__ import annotations

import os
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from ..parallel.sizing import cache_bytes

# Of the machine's memory, what MLX may use (Metal's recommended working set when known).
CPU_USABLE_FRACTION = 0.9


def usable_memory() -> int:
    """Bytes MLX may use on this machine."""
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    for key in ("max_recommended_working_set_size", "memory_size"):
        if info.get(key):
            return int(info[key])
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * CPU_USABLE_FRACTION)


def weights_bytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def default_prompt_cache_bytes(model) -> int:
    """Half of the memory the weights leave: the other half is for the caches in flight."""
    return max(0, (usable_memory() - weights_bytes(model)) // 2)


def request_cache_bytes(model, tokens: int, kv_bits: Optional[int] = None, kv_group_size: int = 64) -> int:
    """Bytes this rank's caches allocate for a sequence of `tokens` (parallel.sizing's count)."""
    tensor = getattr(model, "tensor_group", None)
    first = getattr(model.language_model.model, "layer_offset", 0)
    dtype_bytes = model.language_model.model.norm.weight.dtype.size
    kv, idx = cache_bytes(model.args, tokens, tensor=tensor.size() if tensor is not None else 1,
                          layers=(first, first + len(model.layers)), dtype_bytes=dtype_bytes,
                          kv_bits=kv_bits, index_bits=getattr(model, "index_bits", None), group_size=kv_group_size)
    return kv + idx


def memory_shortfall(model, tokens: int, evictable: int, kv_bits: Optional[int] = None,
                     kv_group_size: int = 64) -> Optional[str]:
    """None if a sequence of `tokens` fits in the memory left, else why not (one line)."""
    need = request_cache_bytes(model, tokens, kv_bits, kv_group_size)
    free = usable_memory() - mx.get_active_memory() + evictable
    if need <= free:
        return None
    return (f"this request's KV cache needs {need / 1e9:.2f} GB for {tokens} tokens (prompt + max_tokens) "
            f"and {max(free, 0) / 1e9:.2f} GB are free; retry later or ask for fewer tokens")
