"""Where a batched decode step's time goes, layer by layer and piece by piece.

bench_batch.py measures whole steps; this splits them. For each context, one
full-attention layer (dense MLP) and one MSA layer (MoE) at the real widths are stepped
with: the single-sequence caches (decode.step), one row through the batch caches
(batch_decode.step, what the server runs for a lone request), and n rows. The MSA layer's
batch step is then timed piece by piece (compiled pre, cache writes, compiled attention,
compiled post), each evaluated on its own.

  python scripts/profile_batch_step.py --contexts 8192,65536 --rows 4 [--kv-bits 4]
  python scripts/profile_batch_step.py --tiny      # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_batch as bb  # noqa: E402
import bench_decode as bd  # noqa: E402

from minimax_m3_mlx.model import batch_decode, batch_msa, decode  # noqa: E402


def _ms(fn, steps: int) -> float:
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:]) * 1e3


def _pieces(layer, x, cache, steps):
    """The MSA layer's batch step (batch_decode.step), each piece evaluated alone."""
    pre, post = decode.pieces(layer)
    attn = layer.self_attn
    out = {}
    state = {}

    def run_pre():
        state["pre"] = pre(x, cache.offset)
        return state["pre"]

    def run_writes():
        q, k, v, idx_q, idx_k = state["pre"]
        cache.update_index(idx_k)
        cache.update_and_fetch(k, v)
        return [p for b in (cache.keys, cache.values, cache.index_keys) for p in (b if isinstance(b, tuple) else (b,))]

    def run_attend():
        q, _, _, idx_q, _ = state["pre"]
        step = batch_msa.compiled_decode_step(attn.scale, attn.block_size, attn.topk, attn.local_blocks, cache)
        state["o"] = step(q, idx_q, cache.keys, cache.values, cache.index_keys, cache.offset - 1)
        return state["o"]

    def run_post():
        return post(x, state["o"])

    for name, fn in (("pre", run_pre), ("writes", run_writes), ("attend", run_attend), ("post", run_post)):
        times = []
        for _ in range(steps):
            if name != "pre":
                run_pre() and mx.eval(state["pre"])
            if name in ("attend", "post"):
                mx.eval(run_writes())
            if name == "post":
                mx.eval(run_attend())
            t = time.perf_counter()
            mx.eval(fn())
            times.append(time.perf_counter() - t)
        out[name] = round(statistics.median(times[1:]) * 1e3, 3)
    return out


def run(a):
    kv_quant = (a.kv_group_size, a.kv_bits) if a.kv_bits else None
    cfg = bd.text_config(1, a.tiny, n_dense=1)
    model = bd.build("ours", cfg, "q4")
    bb.distinct_rows(model, cfg)
    hidden = cfg["hidden_size"]
    records = []
    for S in [int(s) for s in a.contexts.split(",")]:
        capacity = S + 8 * a.steps + 64
        single = bb.filled_caches("ours", model, S, capacity, kv_quant)
        one = bb.merged([bb.filled_caches("ours", model, S, capacity, kv_quant)])
        many = bb.merged([bb.filled_caches("ours", model, S, capacity, kv_quant) for _ in range(a.rows)])
        for li, layer in enumerate(model.layers):
            kind = "msa+moe" if layer.self_attn.is_sparse else "full+mlp"
            rec = {"context": S, "layer": kind, "kv_bits": a.kv_bits}
            for path, caches, B in (("single", single, 1), ("batch1", one, 1), (f"batch{a.rows}", many, a.rows)):
                x = (mx.random.normal((B, 1, hidden)) * 0.1).astype(mx.bfloat16)
                rec[f"{path}_compiled"] = (decode.usable if path == "single" else batch_decode.usable)(
                    layer, x, caches[li])
                rec[f"{path}_ms"] = round(_ms(lambda: layer(x, caches[li]), a.steps), 3)
            if layer.self_attn.is_sparse:
                for path, caches, B in (("batch1", one, 1), (f"batch{a.rows}", many, a.rows)):
                    x = (mx.random.normal((B, 1, hidden)) * 0.1).astype(mx.bfloat16)
                    rec[f"{path}_pieces"] = _pieces(layer, x, caches[li], a.steps)
            records.append(rec)
            print(json.dumps(rec), flush=True)
        single = one = many = None
        mx.clear_cache()
    return records


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", default="8192,65536")
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--kv-bits", type=int, choices=(4, 8), default=None)
    p.add_argument("--kv-group-size", type=int, default=64)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--json")
    a = p.parse_args(argv)
    if a.tiny and a.contexts == "8192,65536":
        a.contexts = "256"
    print(f"device={mx.default_device()} mlx={mx.__version__}", flush=True)
    records = run(a)
    if a.json:
        Path(a.json).write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
