"""`plan`'s --expert-memory section: a single Mac too small for the whole model streams its experts.

The figures: the routed experts' bytes (the bank) and the rest; the memory left for
experts after the rest, the KV cache of the context, one prefill chunk's activations and
the reserve; the hit rate that budget gives under uniform routing (the budget's share of
the bank: the worst case, as routing on random weights is uniform; real routing is
skewed and does better); and the disk-bound decode speed, the SSD's read speed over the
bytes of one token's missed experts.
"""

from __future__ import annotations

from typing import Dict

from ..model.experts import EXPERTS
from ..weights.sharding import TensorInfo

GB = 1e9


def expert_lines(args, table: Dict[str, TensorInfo], host_gb: float, used_by_rest: float, ssd_gbs: float) -> list:
    """Lines that offer --expert-memory on one host of `host_gb` usable GB, where `used_by_rest`
    GB go to everything but the experts (their weights, the caches, the activations)."""
    bank = sum(t.nbytes for k, t in table.items() if EXPERTS in k)
    if not bank:
        return []
    n_layers = sum(1 for i in range(args.num_hidden_layers) if args.is_moe(i))
    per_expert = bank / (n_layers * args.num_local_experts)
    least = args.num_experts_per_tok * n_layers * per_expert
    left = host_gb * GB - used_by_rest
    head = f"With --expert-memory (experts read from the SSD; bank {bank / GB:.1f} GB, " \
           f"{per_expert / 1e6:.1f} MB per expert):"
    if left < least:
        return [head, f"  does not fit either: {left / GB:.1f} GB left for experts, the minimum is {least / GB:.1f} GB", ""]
    share = min(1.0, left / bank)
    per_token = args.num_experts_per_tok * n_layers * per_expert
    missed = (1 - share) * per_token
    speed = f"{ssd_gbs / (missed / GB):.1f} tok/s" if missed else "no reads once warm"
    return [head,
            f"  --expert-memory {int(left / GB)}GB: {share:.0%} of the bank in memory",
            f"  a token uses {per_token / GB:.2f} GB of experts; uniform routing (the worst case) hits {share:.0%},"
            f" reads {missed / GB:.2f} GB per token",
            f"  disk-bound decode at {ssd_gbs:g} GB/s: {speed} (skewed real routing hits more and reads less)", ""]
