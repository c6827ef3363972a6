"""`minimax-m3 plan`: memory per Mac for a cluster, a recipe and a context length.

    minimax-m3 plan --hosts 2x192 --recipe mac-256gb --context 131072
    minimax-m3 plan --hosts 192,128 --model ./MiniMax-M3-4bit --context 32768

For each layout the hosts allow (tensor parallel, pipeline parallel, both), every rank's
weights, KV cache (K and V of its KV heads), index-key cache, and an estimate of the
transient memory of one prefill chunk; whether that fits each host; and the layout to
use. The weight and cache figures are computed by the code that sizes the real load
(parallel.sizing.rank_usage / cache_bytes on the tensor table that convert.recipes.output_tensors
writes, or that a checkpoint's headers give): they are the bytes the per-rank loader (loading/sharded.py) loads
and the caches allocate, not an approximation of them.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..arg_types import ArgumentParser, non_negative_float, positive_float, positive_int
from ..config import ModelArgs
from ..io.dtypes import DTYPES, FLOAT_TAGS
from ..convert.recipes import (
    REAL_CONFIG, RECIPES, Policy, QuantSpec, config_dtype, model_layout, output_tensors, uniform_policy,
)
from ..loading.sharded import inspect_checkpoint
from ..parallel.sizing import activation_bytes, cache_bytes, rank_usage, table_from_shapes
from .plan_experts import expert_lines, load_hit_curve
from ..weights.sharding import ShardingError, TensorInfo, check_pipeline, check_tensor_parallel, default_split

GB = 1e9
# Recipes beyond recipes.RECIPES: the published checkpoints as they load, and uniform affine.
EXTRA_RECIPES = {
    "bf16": "the BF16 release (nothing quantised)",
    "mxfp8": "the official MXFP8 release: attention, experts, shared expert and dense MLPs in mxfp8; "
             "index projections, router, embeddings, lm_head in BF16",
}
UNIFORM = re.compile(r"^q([2-8])$")  # q4: 4-bit affine g64 everywhere (router excepted)


def recipe_names() -> List[str]:
    return list(RECIPES) + list(EXTRA_RECIPES) + ["q2", "q3", "q4", "q5", "q6", "q8"]


def recipe_policy(name: str):
    """A recipes.Policy for `name` (None: unquantised)."""
    if name in RECIPES:
        return RECIPES[name]
    if name == "bf16":
        return None
    if name == "mxfp8":
        spec = QuantSpec.make(8, 32, "mxfp8")
        return Policy("mxfp8", EXTRA_RECIPES["mxfp8"],
                      {c: spec for c in ("attention", "experts", "shared", "dense")})
    m = UNIFORM.match(name)
    if m:
        return uniform_policy(int(m.group(1)), 64, "affine")
    raise ValueError(f"--recipe {name!r}: unknown; choose from {', '.join(recipe_names())}")


def recipe_table(config: dict, recipe: str, dtype: Optional[str] = None) -> Dict[str, TensorInfo]:
    """The tensors of the model `config` describes, converted with `recipe`."""
    shapes, quantisable = model_layout(config)
    return table_from_shapes(output_tensors(shapes, quantisable, recipe_policy(recipe),
                                                 dtype or config_dtype(config)))


# -- per-rank figures ------------------------------------------------------------------------------
@dataclass
class RankPlan:
    rank: int
    stage: int
    tensor_rank: int
    layers: Tuple[int, int]
    weights: int
    kv: int
    index: int
    activations: int
    capacity: int

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.index + self.activations

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity


@dataclass
class LayoutPlan:
    name: str
    tensor: int
    pipeline: int
    ranks: List[RankPlan]
    error: Optional[str] = None
    split: Optional[List[int]] = None

    @property
    def fits(self) -> bool:
        return self.error is None and all(r.fits for r in self.ranks)

    @property
    def peak(self) -> int:
        return max((r.total for r in self.ranks), default=0)


def plan_for(args, table, tensor: int, pipeline: int, capacities: Sequence[int], context: int,
                batch: int = 1, chunk: int = 2048, dtype_bytes: int = 2, cache_quant=None) -> LayoutPlan:
    name = "tensor" if pipeline == 1 else "pipeline" if tensor == 1 else f"both ({tensor} x {pipeline})"
    try:
        check_tensor_parallel(args, table, tensor)
        check_pipeline(args.num_hidden_layers, pipeline)
    except ShardingError as e:
        return LayoutPlan(name, tensor, pipeline, [], str(e))
    split = default_split(args, table, pipeline)
    ranks = []
    for r in range(tensor * pipeline):
        u = rank_usage(args, table, tensor, pipeline, r, split)
        kv, idx = cache_bytes(args, context, tensor, u.layers, batch, dtype_bytes, **(cache_quant or {}))
        act = activation_bytes(args, min(chunk, max(context, 1)), tensor, batch, dtype_bytes, context)
        ranks.append(RankPlan(r, u.stage, u.tensor_rank, u.layers, u.weight_bytes, kv, idx, act, capacities[r]))
    return LayoutPlan(name, tensor, pipeline, ranks, split=split)


def candidate_layouts(n: int) -> List[Tuple[int, int]]:
    out = [(n, 1)] if n > 1 else [(1, 1)]
    if n > 1:
        out.append((1, n))
    out += [(t, n // t) for t in range(2, n) if n % t == 0 and n // t >= 2]
    return out


def recommend(plans: List[LayoutPlan]) -> Tuple[Optional[LayoutPlan], str]:
    fitting = [p for p in plans if p.fits]
    if not fitting and all(p.error for p in plans):  # the rank count is the cause, not the memory
        return None, ("no layout asked for is possible with this many Macs (see above): --layout pipeline "
                      "takes any number of Macs")
    if not fitting:
        return None, ("does not fit: use a smaller recipe, a shorter context, or more Macs "
                       "(see the per-rank totals above)")
    # Tensor parallel reads 1/N of every token's weights on each Mac at once (decode ~N x
    # faster) but sums twice per layer per token: best on Thunderbolt 5 / JACCL. Pipeline
    # reads them one Mac after another (no decode speed-up), with one hand-over per stage.
    for kind in ("tensor", "both", "pipeline"):
        for p in fitting:
            if p.name.startswith(kind):
                why = {
                    "tensor": "every Mac reads 1/N of each token's weights at once (fastest decode; "
                              "two all-sums per layer per token: prefer JACCL / Thunderbolt 5)",
                    "both": "tensor parallel inside each stage where the heads allow it, stages for the rest",
                    "pipeline": "layers split by bytes; one hand-over per stage per token (works on any "
                                "link; no decode speed-up over one Mac)",
                }[kind]
                return p, why
    return fitting[0], ""


def parse_hosts(spec: str) -> List[float]:
    """'2x192' -> [192, 192]; '192,128' -> [192, 128] (GB per host, in hostfile order)."""
    out: List[float] = []
    for part in spec.split(","):
        part = part.strip().lower().replace("gb", "")
        m = re.fullmatch(r"(\d+)x(\d+(?:\.\d+)?)", part)
        if m:
            out += [float(m.group(2))] * int(m.group(1))
        elif re.fullmatch(r"\d+(?:\.\d+)?", part):
            out.append(float(part))
        else:
            raise ValueError(f"--hosts {spec!r}: expected NxGB (2x192) or a list of GB (192,128)")
    if not out:
        raise ValueError(f"--hosts {spec!r}: no hosts")
    if min(out) <= 0:
        raise ValueError(f"--hosts {spec!r}: every host needs some memory, got {min(out):g} GB")
    return out


def make_plans(args, table, hosts_gb: Sequence[float], context: int, batch: int, chunk: int,
               reserve_gb: float, dtype_bytes: int, layouts=None, cache_quant=None) -> List[LayoutPlan]:
    capacities = [int((h - reserve_gb) * GB) for h in hosts_gb]
    return [plan_for(args, table, t, p, capacities, context, batch, chunk, dtype_bytes, cache_quant)
            for t, p in (layouts or candidate_layouts(len(hosts_gb)))]


def format_plans(plans: List[LayoutPlan], hosts_gb: Sequence[float], title: str) -> str:
    lines = [title, ""]
    for p in plans:
        if p.error:
            lines += [f"{p.name}: not possible: {p.error}", ""]
            continue
        split = f"  (layers per stage, rank 0's first: {p.split}; rank 0 runs the last layers)"
        lines.append(f"{p.name}: {'fits' if p.fits else 'DOES NOT FIT'}" + (split if p.pipeline > 1 else ""))
        lines.append(f"  {'rank':>4} {'host':>6} {'layers':>9} {'weights':>9} {'KV':>8} {'index':>8} "
                     f"{'activ.':>8} {'total':>9} {'usable':>8}  fits")
        for r in p.ranks:
            lines.append(
                f"  {r.rank:>4} {hosts_gb[r.rank]:>5.0f}G {r.layers[0]:>4}-{r.layers[1] - 1:<4} "
                f"{r.weights / GB:>8.1f}G {r.kv / GB:>7.2f}G {r.index / GB:>7.2f}G {r.activations / GB:>7.2f}G "
                f"{r.total / GB:>8.1f}G {r.capacity / GB:>7.1f}G  {'yes' if r.fits else 'NO'}"
            )
        lines.append("")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(prog="minimax-m3 plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", required=True, help="Macs and their memory: 2x192, 4x128 or 192,128 (GB)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--recipe", help=f"conversion recipe: {', '.join(recipe_names())}")
    src.add_argument("--model", help="a converted (or published) checkpoint folder: plan from its headers")
    ap.add_argument("--config", help="config.json of the model (default: the real MiniMax-M3)")
    ap.add_argument("--context", type=positive_int, default=32768, help="tokens of context per sequence (default 32768)")
    ap.add_argument("--batch", type=positive_int, default=1, help="sequences decoded together (default 1)")
    ap.add_argument("--prefill-chunk", type=positive_int, default=2048, help="prefill step size (mlx-lm default 2048)")
    ap.add_argument("--dtype", choices=list(FLOAT_TAGS), help="float dtype (default: config's)")
    ap.add_argument("--reserve-gb", type=non_negative_float, default=8.0,
                    help="memory left to macOS and other programs on each Mac (default 8)")
    ap.add_argument("--layout", choices=("all", "tensor", "pipeline", "both"), default="all",
                    help="the layouts to plan: tensor or pipeline parallel, both, or all (default)")
    ap.add_argument("--kv-bits", type=int, choices=(4, 8), help="quantized cache (as generate/server --kv-bits)")
    ap.add_argument("--kv-group-size", type=int, default=64, choices=(32, 64, 128),
                    help="group size of the quantized cache (default 64)")
    ap.add_argument("--index-bits", type=int, choices=(4, 8, 16, 32),
                    help="index keys (default: 8 with --kv-bits, else the config's index_cache_dtype)")
    ap.add_argument("--ssd-gbs", type=positive_float, default=6.0,
                    help="the Mac's SSD read speed in GB/s, for the --expert-memory estimate (default 6)")
    ap.add_argument("--hit-curve", metavar="FILE",
                    help="a measured hit-rate curve (scripts/expert_policies.py --json) for the "
                         "--expert-memory estimate; without it only uniform routing (the worst case)")
    ap.add_argument("--json", action="store_true", help="print the plans as JSON")
    return ap


def _source(a) -> Tuple[dict, Dict[str, TensorInfo], str]:
    """(config, tensor table, what it is) from --model's headers, or --config with --recipe."""
    if a.model:
        ck = inspect_checkpoint(a.model)
        return ck.config, ck.table, f"checkpoint {a.model} ({ck.model.checkpoint_layout})"
    config_path = Path(a.config or REAL_CONFIG)
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--config {config_path}: not valid JSON ({e})") from None
    recipe = a.recipe or "mac-256gb"
    return config, recipe_table(config, recipe, a.dtype), f"recipe {recipe}"


def _layouts(kind: str, n: int) -> List[Tuple[int, int]]:
    layouts = candidate_layouts(n)
    if kind != "all":
        layouts = [(t, p) for t, p in layouts
                   if (kind == "tensor" and p == 1) or (kind == "pipeline" and t == 1 and p > 1)
                   or (kind == "both" and t > 1 and p > 1)]
        if not layouts:
            raise ValueError(f"--layout {kind}: not possible with {n} host(s)")
    return layouts


def _print_recommendation(best: Optional[LayoutPlan], why: str) -> int:
    if best is None:
        print(f"Recommended: nothing — {why}")
        return 1
    mode = "tensor" if best.pipeline == 1 else "pipeline" if best.tensor == 1 else "both"
    print(f"Recommended: {best.name} — {why}.")
    print(f"  load with minimax_m3_mlx.load(path, group=mx.distributed.init(), mode={mode!r}"
          + (f", tensor={best.tensor}" if mode == "both" else "") + ") under mlx.launch; see docs/distributed.md.")
    need_mb = int(max(r.total for r in best.ranks) / 2**20) + 1024
    print(f"  macOS wires at most ~75% of RAM for the GPU by default; allow this much on each Mac with:\n"
          f"    sudo sysctl iogpu.wired_limit_mb={need_mb}")
    return 0


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    hosts = parse_hosts(a.hosts)
    if min(hosts) <= a.reserve_gb:
        raise ValueError(f"--hosts {a.hosts}: a host of {min(hosts):g} GB has nothing left after --reserve-gb "
                         f"{a.reserve_gb:g}")
    curve = load_hit_curve(a.hit_curve) if a.hit_curve else None
    config, table, what = _source(a)
    args = ModelArgs.from_dict(config)
    if curve is not None:
        curve.check(args)
    if a.context > args.max_position_embeddings:
        raise ValueError(f"--context {a.context}: past the model's context of {args.max_position_embeddings} "
                         f"tokens (max_position_embeddings)")
    dtype = a.dtype or config_dtype(config)
    if dtype not in FLOAT_TAGS:
        raise ValueError(f"the config's dtype {dtype!r} is not a float dtype; pass --dtype")
    dtype_bytes = DTYPES[FLOAT_TAGS[dtype]].itemsize
    cache_quant = dict(kv_bits=a.kv_bits, index_bits=a.index_bits, group_size=a.kv_group_size)
    plans = make_plans(args, table, hosts, a.context, a.batch, a.prefill_chunk, a.reserve_gb, dtype_bytes,
                       _layouts(a.layout, len(hosts)), cache_quant)
    best, why = recommend(plans)
    total_weights = sum(i.nbytes for i in table.values())
    if a.json:
        print(json.dumps({
            "source": what, "hosts_gb": hosts, "context": a.context, "weights_total": total_weights,
            "plans": [dict(asdict(p), fits=p.fits,
                           ranks=[dict(asdict(r), total=r.total, fits=r.fits) for r in p.ranks]) for p in plans],
            "recommended": best.name if best else None, "why": why,
        }, indent=1))
        return 0 if best else 1
    title = (f"MiniMax-M3, {what}: {total_weights / GB:.1f} GB of weights; {len(hosts)} Mac(s) "
             f"({', '.join(f'{h:.0f}' for h in hosts)} GB, {a.reserve_gb:.0f} GB reserved each); "
             f"context {a.context} x batch {a.batch}, prefill chunk {a.prefill_chunk}, {dtype}")
    print(format_plans(plans, hosts, title))
    kv, idx = cache_bytes(args, 1 << 20, dtype_bytes=dtype_bytes, **cache_quant)
    print(f"Cache: {(kv + idx) / (1 << 20) / 1024:.1f} KiB per token ({kv / (1 << 20) / 1024:.1f} K/V, "
          f"{idx / (1 << 20) / 1024:.1f} index keys, whole model)")
    for p in plans:
        if p.fits:
            n = min(largest_context(p, a.context), args.max_position_embeddings)
            limit = " (the model's limit)" if n == args.max_position_embeddings else ""
            print(f"  largest context with {p.name}: about {n:,} tokens per sequence{limit}")
    if best is None and len(hosts) == 1 and plans[0].ranks:
        r = plans[0].ranks[0]
        print("\n".join(expert_lines(args, table, r.capacity / GB, r.total - sum(
            t.nbytes for k, t in table.items() if ".mlp.switch_mlp." in k), a.ssd_gbs, curve)))
    return _print_recommendation(best, why)


def largest_context(plan: LayoutPlan, context: int) -> int:
    """The context (per sequence, at the plan's batch) the plan's tightest rank has room for:
    its caches grow with the context, its weights do not, its prefill activations barely
    (per-block scores: a few hundred bytes per token against the cache's tens of KB)."""
    most = None
    for r in plan.ranks:
        per_token = (r.kv + r.index) / context
        if per_token:
            n = int((r.capacity - r.weights - r.activations) / per_token)
            most = n if most is None else min(most, n)
    return max(0, most if most is not None else context)


if __name__ == "__main__":
    sys.exit(main())
