"""One MiniMax-M3 sparse attention layer at the real head dims, timed against dense and mlx-lm.

Side by side in one process, on the same random weights and the same filled cache of S
tokens, as generation runs it (the cache advances a token per decode step and is the only
holder of its buffers):
  ours    this package's Attention on an MSA layer (projections, norms, RoPE, index
          branch, cache update, block-sparse attention)
  dense   the same layer with sparsity off: fused mx.fast.scaled_dot_product_attention
          over the whole cached K/V (mlx-lm's KVCache), projections included the same
          way. (Copying K/V contiguous before SDPA was also tried: slower when the cache
          advances every step; see BENCHMARKS.md.)
  mlx_lm  mlx-lm 0.32.2's minimax_m3_vl Attention (dense attention under a block mask)
plus `bound`: the bytes each implementation must read, over the device's measured copy
bandwidth (the bandwidth limit). Phases: decode (one token at context S) and prefill (one
chunk ending at context S).

  python scripts/bench_msa.py --contexts 16384,65536 --dtype float32 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from minimax_m3_mlx.model.attention import Attention  # noqa: E402
from minimax_m3_mlx.model.cache import SparseKVCache  # noqa: E402
from minimax_m3_mlx.config import ModelArgs  # noqa: E402
from mlx_lm.models.cache import CacheList, KVCache  # noqa: E402
from masked_reference import masked_forward  # noqa: E402


REAL = dict(vocab_size=200064, dense_intermediate_size=12288,
            hidden_size=6144, num_attention_heads=64, num_key_value_heads=4, head_dim=128, rotary_dim=64,
            rope_theta=5e6, index_n_heads=4, index_head_dim=128, index_block_size=128, index_topk_blocks=16,
            index_local_blocks=1, max_position_embeddings=1 << 21, num_hidden_layers=1)
GB = 1 << 30
# (group_size, bits, index_bits) from --kv-bits: ours and dense then run quantized caches.
CACHE_QUANT = None


def our_layer(dtype, sparse: bool, index_cache_dtype: str):
    args = ModelArgs.from_dict({**REAL, "layer_types": ["minimax_m3_sparse" if sparse else "full_attention"],
                                "mlp_layer_types": ["dense"], "index_cache_dtype": index_cache_dtype})
    layer = Attention(args, 0)
    layer.set_dtype(dtype)
    return layer, args


class MaskedLayer:
    """Our sparse layer computing dense attention under its selection's mask."""

    def __init__(self, attn):
        self.attn = attn

    def __call__(self, x, cache=None):
        return masked_forward(self.attn, x, cache)

    def parameters(self):
        return self.attn.parameters()


def mlx_lm_layer(dtype):
    from mlx_lm.models.minimax_m3_vl import Attention as LmAttention, TextArgs

    targs = TextArgs(**{k: v for k, v in REAL.items() if k in TextArgs.__dataclass_fields__},
                     layer_types=["minimax_m3_sparse"], mlp_layer_types=["dense"])
    layer = LmAttention(targs, 0)
    layer.set_dtype(dtype)
    return layer


def _filled(shape, capacity, dtype):
    """A [B, H, capacity, D] buffer whose first shape[2] slots hold random data."""
    B, H, S, D = shape
    buf = mx.zeros((B, H, capacity, D), dtype)
    buf[:, :, :S, :] = mx.random.normal((B, H, S, D)).astype(dtype)
    mx.eval(buf)
    return buf


def make_cache(impl, S, capacity, dtype, index_dtype, block=128):
    kv = (1, REAL["num_key_value_heads"], S, REAL["head_dim"])
    if impl.startswith("ours"):
        c = SparseKVCache(block, index_dtype=index_dtype)
        cap = -(-capacity // c.step) * c.step
        c.keys, c.values = _filled(kv, cap, dtype), _filled(kv, cap, dtype)
        c.index_keys = _filled((1, 1, S, REAL["index_head_dim"]), cap, getattr(mx, index_dtype) if index_dtype else dtype)
        c.offset = S
        if CACHE_QUANT:
            c.index_bits = CACHE_QUANT[2]
            c = c.to_quantized(*CACHE_QUANT[:2])
        return c
    main = KVCache()
    main.keys, main.values, main.offset = _filled(kv, capacity, dtype), _filled(kv, capacity, dtype), S
    if impl == "dense":
        return main.to_quantized(*CACHE_QUANT[:2]) if CACHE_QUANT else main
    idx = KVCache()
    idx.keys = _filled((1, 1, S, REAL["index_head_dim"]), capacity, dtype)
    idx.values = mx.zeros((1, 1, capacity, 0), dtype)
    idx.offset = S
    return CacheList(main, idx)


def _rewind(cache, n):
    for c in (cache.caches if isinstance(cache, CacheList) else [cache]):
        c.offset -= n


def time_impl(impl, layer, phase, S, dtype, index_dtype, steps, chunk):
    L = 1 if phase == "decode" else chunk
    start = S - L
    cache = make_cache(impl, start, S + steps * L + 256, dtype, index_dtype)
    x = (mx.random.normal((1, L, REAL["hidden_size"])) * 0.5).astype(dtype)
    mx.eval(x)
    mask = None if (phase == "decode" or impl != "mlx_lm") else "causal"
    times = []
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    for i in range(steps + 1):
        t0 = time.perf_counter()
        out = layer(x, mask=mask, cache=cache) if impl == "mlx_lm" else layer(x, cache=cache)
        mx.eval(out)
        if impl != "mlx_lm":
            mx.eval(cache.keys, cache.values)
        times.append(time.perf_counter() - t0)
        del out
        if phase == "prefill":
            _rewind(cache, L)  # every prefill step ends at context S
    peak = mx.get_peak_memory()
    del cache
    gc.collect()
    mx.clear_cache()
    return statistics.median(times[1:]) * 1e3, peak / GB, (peak - base) / GB


def check_equivalence(layer, S, L, dtype, index_dtype):
    """ours (gather) vs the same layer under the dense block mask: rel err of the outputs."""
    outs = []
    for impl in ("gather", "masked"):
        mx.random.seed(1)
        cache = make_cache("ours", S - L, S + 256, dtype, index_dtype)
        x = (mx.random.normal((1, L, REAL["hidden_size"])) * 0.5).astype(dtype)
        out = masked_forward(layer, x, cache) if impl == "masked" else layer(x, cache=cache)
        outs.append(out.astype(mx.float32))
        mx.eval(outs[-1])
        del cache
    a, b = outs
    return (mx.linalg.norm((a - b).flatten()) / mx.linalg.norm(b.flatten())).item()


def measured_bandwidth():
    """Device copy bandwidth (bytes/s): read + write of a 1 GiB array."""
    x = mx.random.uniform(shape=(GB // 4,))
    mx.eval(x)
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        mx.eval(x + 1.0)
        ts.append(time.perf_counter() - t0)
    del x
    mx.clear_cache()
    return 2 * GB / min(ts)


def bytes_read(impl, phase, S, itemsize, index_itemsize, chunk):
    """Minimum bytes a step reads: weights it uses + the cache it must touch."""
    H, Hq, Hkv, D = REAL["hidden_size"], REAL["num_attention_heads"], REAL["num_key_value_heads"], REAL["head_dim"]
    w = (2 * H * Hq * D + 2 * H * Hkv * D) * itemsize
    kv_per_token = 2 * Hkv * D * itemsize
    if impl == "dense":
        return w + S * kv_per_token
    w += (H * REAL["index_n_heads"] * REAL["index_head_dim"] + H * REAL["index_head_dim"]) * itemsize
    idx = S * REAL["index_head_dim"] * index_itemsize
    sel = min(S, REAL["index_block_size"] * REAL["index_topk_blocks"]) * kv_per_token
    if phase == "prefill":  # each query reads its own selection
        sel *= chunk
    return w + idx + sel


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="16384,65536")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--phases", default="decode,prefill")
    p.add_argument("--impls", default="ours,dense,mlx_lm")
    p.add_argument("--index-cache-dtype", default="float32", choices=["float32", "model"],
                   help="dtype of cached index keys in ours (float32 = the reference's exact scores)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--prefill-steps", type=int, default=2)
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--mlx-lm-prefill-max", type=int, default=131072,
                   help="skip mlx-lm prefill above this context (its dense mask does not fit)")
    p.add_argument("--json", default=None)
    p.add_argument("--gather-tile-mb", type=int, default=None,
                   help="override msa.GATHER_TILE_BYTES (for measuring the choice)")
    p.add_argument("--gather-word", default=None, choices=["uint32", "uint64"],
                   help="override msa's gather word for 2-byte caches (for measuring the choice)")
    p.add_argument("--check", type=int, default=0, metavar="S",
                   help="first check ours == masked dense at context S (decode and a chunk)")
    p.add_argument("--dense-prefill-max", type=int, default=1 << 30,
                   help="skip dense prefill above this context (MLX's CUDA SDPA is not fused for prefill)")
    p.add_argument("--kv-bits", type=int, choices=(4, 8), default=None,
                   help="quantized caches for ours and dense (mlx-lm's port cannot quantize its own)")
    p.add_argument("--kv-group-size", type=int, default=64)
    p.add_argument("--index-bits", type=int, choices=(4, 8, 16, 32), default=8)
    p.add_argument("--sparse-quant", choices=("dequantize", "matmul"), default="matmul",
                   help="attention over gathered quantized blocks (kvquant.SPARSE_ATTENTION; decode)")
    a = p.parse_args(argv)

    dtype = getattr(mx, a.dtype)
    import minimax_m3_mlx.model.msa as msa
    from minimax_m3_mlx.model import kvquant

    global CACHE_QUANT
    CACHE_QUANT = (a.kv_group_size, a.kv_bits, a.index_bits) if a.kv_bits else None
    kvquant.SPARSE_ATTENTION = a.sparse_quant

    if a.gather_word:
        msa.GATHER_WORDS[2] = getattr(mx, a.gather_word)
    if a.gather_tile_mb:
        msa.GATHER_TILE_BYTES = a.gather_tile_mb << 20
    contexts = [int(s) for s in a.contexts.split(",")]
    impls = a.impls.split(",")
    index_dtype = "float32" if a.index_cache_dtype == "float32" else None
    mx.random.seed(0)
    layers = {"ours": our_layer(dtype, True, a.index_cache_dtype)[0], "dense": our_layer(dtype, False, "float32")[0]}
    if "mlx_lm" in impls:
        layers["mlx_lm"] = mlx_lm_layer(dtype)
    if "ours_masked" in impls:  # for the crossover: our selection, dense attention under its mask
        layers["ours_masked"] = MaskedLayer(our_layer(dtype, True, a.index_cache_dtype)[0])
    for m in layers.values():
        mx.eval(m.parameters())
    bw = measured_bandwidth()
    records = []
    if a.check:
        for L in (1, min(a.chunk, 512)):
            e = check_equivalence(layers["ours"], a.check, L, dtype, index_dtype)
            print(f"check: gather vs masked dense, context {a.check}, {L} queries: rel err {e:.2e}", flush=True)
    print(f"device={mx.default_device()} dtype={a.dtype} index_cache={a.index_cache_dtype} "
          f"kv_bits={a.kv_bits} index_bits={a.index_bits if a.kv_bits else None} sparse_quant={a.sparse_quant} bandwidth={bw / 1e9:.0f} GB/s",
          flush=True)
    for phase in a.phases.split(","):
        for S in contexts:
            for impl in impls:
                cap = {"mlx_lm": a.mlx_lm_prefill_max, "dense": a.dense_prefill_max}.get(impl, 1 << 30)
                if phase == "prefill" and S > cap:
                    records.append({"impl": impl, "phase": phase, "context": S, "ms": None, "peak_gb": None,
                                    "skipped": f"context > prefill max {cap} for {impl}"})
                    continue
                steps = a.steps if phase == "decode" else a.prefill_steps
                ms, peak, extra = time_impl(impl, layers[impl], phase, S, dtype,
                                            index_dtype if impl.startswith("ours") else None, steps, a.chunk)
                rec = {"impl": impl, "phase": phase, "context": S, "ms": round(ms, 3), "peak_gb": round(peak, 3),
                       "extra_gb": round(extra, 3)}
                if impl in ("ours", "dense") and not CACHE_QUANT:  # bytes_read counts a plain cache
                    nb = bytes_read(impl, phase, S, dtype.size,
                                    4 if (impl == "ours" and index_dtype is not None) else dtype.size, a.chunk)
                    rec["bound_ms"] = round(nb / bw * 1e3, 3)
                records.append(rec)
                print(json.dumps(rec), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(records, indent=1))
    _table(records)


def _table(records):
    by = {(r["phase"], r["context"], r["impl"]): r for r in records}
    print(f"\n{'phase':<8}{'context':>9}{'ours ms':>10}{'dense ms':>10}{'mlx_lm ms':>11}{'dense/ours':>11}"
          f"{'mlx_lm/ours':>12}{'ours bound':>11}{'ours extra GB':>14}{'dense extra GB':>15}{'mlx_lm extra GB':>16}")
    for phase, S in sorted({(r["phase"], r["context"]) for r in records}):
        o, d, m = (by.get((phase, S, i), {}) for i in ("ours", "dense", "mlx_lm"))

        def f(r, k, w, fmt="{:.3f}"):
            return (fmt.format(r[k]) if r.get(k) is not None else "-").rjust(w)

        ratio = lambda r: (f"{r['ms'] / o['ms']:.1f}x" if r.get("ms") and o.get("ms") else "-")
        print(f"{phase:<8}{S:>9}{f(o, 'ms', 10)}{f(d, 'ms', 10)}{f(m, 'ms', 11)}{ratio(d):>11}{ratio(m):>12}"
              f"{f(o, 'bound_ms', 11)}{f(o, 'extra_gb', 14)}{f(d, 'extra_gb', 15)}{f(m, 'extra_gb', 16)}")


if __name__ == "__main__":
    main()
