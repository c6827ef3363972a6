"""`plan`'s --expert-memory section: a single Mac too small for the whole model streams its experts.

The figures: the routed experts' bytes (the bank) and the rest; the memory left for
experts after the rest, the KV cache of the context, one prefill chunk's activations and
the reserve; the hit rate that budget gives; and the disk-bound decode speed, the SSD's
read speed over the bytes of one token's missed experts:

    tok/s = SSD GB/s / ((1 - hit rate) x GB of experts per token)

The hit rate is always shown for uniform routing (the budget's share of the bank: the
worst case, as routing on random weights is uniform), and, given `--hit-curve FILE`, read
off a measured curve: the JSON that scripts/expert_policies.py writes from a routing trace
(`generate --expert-trace`), fraction of the bank -> decode hit rate of the policy the
pools run. The curve is only as real as its trace: its `source` line is printed with it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ..model.experts import EXPERTS, POLICY
from ..weights.sharding import TensorInfo

GB = 1e9


@dataclass
class HitCurve:
    """Fraction of the bank in memory -> hit rate, from a trace."""

    fractions: List[float]
    hit_rates: List[float]
    source: str
    path: str = ""
    routing: Optional[tuple] = None  # (experts per layer, top-k) of the traced model, where known

    def check(self, args) -> None:
        """A curve of another routing shape says nothing about this model's budgets."""
        mine = (args.num_local_experts, args.num_experts_per_tok)
        if self.routing is not None and self.routing != mine:
            raise ValueError(f"--hit-curve {self.path}: traced on a model that routes {self.routing[1]} of "
                             f"{self.routing[0]} experts; this one routes {mine[1]} of {mine[0]}")

    def at(self, share: float) -> float:
        """Linear between the measured budgets, from no hits at an empty pool; flat past the last."""
        return float(np.interp(share, [0.0, *self.fractions], [0.0, *self.hit_rates]))


def load_hit_curve(path) -> HitCurve:
    """The curve of POLICY from scripts/expert_policies.py's JSON; anything else is refused by name."""
    try:
        data = json.loads(Path(path).read_text())
        points = data["curves"][POLICY]
        source = str(data.get("source") or "unknown routing")
        fractions, rates = ([float(p[i]) for p in points] for i in (0, 1))
        routing = (int(data["n_experts"]), int(data["top_k"])) if "n_experts" in data and "top_k" in data else None
    except FileNotFoundError:
        raise ValueError(f"--hit-curve {path}: no such file") from None
    except (json.JSONDecodeError, KeyError, TypeError, IndexError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"--hit-curve {path}: not a hit-rate curve from scripts/expert_policies.py "
                         f"(needs curves.{POLICY}: [[fraction, hit rate], ...]; {type(e).__name__}: {e})") from None
    if not fractions or any(not 0 < f <= 1 for f in fractions) or any(not 0 <= r <= 1 for r in rates) \
            or fractions != sorted(fractions):
        raise ValueError(f"--hit-curve {path}: curves.{POLICY} needs increasing fractions in (0, 1] "
                         f"and hit rates in [0, 1]")
    return HitCurve(fractions, rates, source, str(path), routing)


def speed(ssd_gbs: float, missed: float) -> str:
    return f"{ssd_gbs / (missed / GB):.1f} tok/s" if missed > 0 else "no reads once warm"


def expert_lines(args, table: Dict[str, TensorInfo], host_gb: float, used_by_rest: float, ssd_gbs: float,
                 curve: Optional[HitCurve] = None) -> list:
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
    lines = [head,
             f"  --expert-memory {int(left / GB)}GB: {share:.0%} of the bank in memory",
             f"  a token uses {per_token / GB:.2f} GB of experts; uniform routing (the worst case) hits {share:.0%},"
             f" reads {missed / GB:.2f} GB per token",
             f"  disk-bound decode at {ssd_gbs:g} GB/s: {speed(ssd_gbs, missed)}"
             + ("" if curve else " (skewed real routing hits more and reads less)")]
    if curve is not None:
        hit = curve.at(share)
        got = (1 - hit) * per_token
        lines += [f"  measured curve ({curve.source}):",
                  f"    hits {hit:.1%} at {share:.0%} of the bank, reads {got / GB:.2f} GB per token; "
                  f"at {ssd_gbs:g} GB/s: {speed(ssd_gbs, got)}",
                  f"    = {ssd_gbs:g} GB/s / ((1 - {hit:.3f}) x {per_token / GB:.2f} GB)"]
    else:
        lines.append("  a measured hit rate: record `generate --expert-trace FILE`, replay it with "
                     "scripts/expert_policies.py --json CURVE, pass --hit-curve CURVE")
    return lines + [""]
