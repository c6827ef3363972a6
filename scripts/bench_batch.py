"""Batched decode at the real widths: aggregate tok/s and experts read per step, ours vs mlx-lm's port.

The model is bench_decode.py's (configs/minimax_m3.json, its 3 dense layers + N MoE layers
with sparse attention, random quantized weights). For each implementation, context S and
stream count n, n single-sequence caches are filled to S and merged into the batch caches
the implementation's `merge` gives (ours: BatchKVCache + BatchSparseCache; mlx-lm's port:
a CacheList of BatchKVCaches, as mlx-lm's BatchGenerator merges it); then greedy decode
steps of all n rows run as mlx-lm's GenerationBatch runs them (model on [n, 1], next
step queued with async_eval before the current one is read). One stream takes the
single-sequence path (mlx-lm's generate_step), which is what `--decode-concurrency 1`
serves.

  tok_s        aggregate decode tokens/s (n rows per step / median step time)
  experts      distinct routed experts per MoE layer and step, measured (op-by-op pass
               with the router's choices recorded) and predicted for random routing:
               E * (1 - (1 - k/E)^n)
  bytes model  bytes a step reads: non-expert weights once, each distinct expert once,
               each row's cache; predicted tok/s = n * bandwidth / bytes, and the speedup
               over one stream it implies (the bound of issue #13: ~1.5x at 4, ~1.75x at 8)

  python scripts/bench_batch.py --contexts 8192,65536 --streams 1,2,4,8 --layers 10 --json out.json
  python scripts/bench_batch.py --tiny     # reduced widths: a CPU smoke run
  python scripts/bench_batch.py --impls ours --kv-bits 4   # the server's quantized batch caches

At one stream, `batch_path_ms_per_step` is the same stream through the batch caches (what
the server runs for a lone request when --decode-concurrency > 1).
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
import mlx.nn as nn
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_decode as bd  # noqa: E402
from mlx_lm.models.switch_layers import SwitchGLU  # noqa: E402

from minimax_m3_mlx.model import batch_decode, decode  # noqa: E402
from minimax_m3_mlx.model.cache import SparseKVCache  # noqa: E402
from minimax_m3_mlx.model.kvquant import QuantizedSparseKVCache  # noqa: E402


def distinct_rows(model, cfg, scale=30.0):
    """Random quantized weights give every token nearly the same hidden state (a large
    component common to all rows), so every row would pick the same experts. Issue #13's
    bound is for random routing: a float embedding large against that common part makes
    the rows' routing differ (one row of it is read per token, as before)."""
    emb = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
    emb.weight = (mx.random.normal(emb.weight.shape) * scale).astype(mx.bfloat16)
    model.language_model.model.embed_tokens = emb
    mx.eval(emb.parameters())


def filled_caches(impl, model, S, capacity, kv_quant=None):
    """Filled single-sequence caches; kv_quant = (group_size, bits): ours quantized on every
    layer as the server makes them under --kv-bits (QuantizedSparseKVCache, which merges
    into a batch; mlx-lm's port cannot quantize its cache)."""
    if impl != "ours":
        return bd._lm_caches(model, S, capacity)
    caches = bd.make_caches(impl, model, S, capacity)
    if kv_quant is not None:
        caches = [_quantized(c, *kv_quant, model.args.index_block_size) for c in caches]
        mx.eval([c.state for c in caches])
    return caches


def _quantized(cache, group_size, bits, block_size):
    if isinstance(cache, SparseKVCache):
        return cache.to_quantized(group_size, bits)
    q = QuantizedSparseKVCache(block_size, group_size, bits)  # a full-attention layer: no index keys
    q.update_and_fetch(cache.keys[..., : cache.offset, :], cache.values[..., : cache.offset, :])
    return q


def merged(singles):
    return [type(c).merge([s[i] for s in singles]) for i, c in enumerate(singles[0])]


def _next_tokens(logits, vocab):
    """Greedy, then shifted by a random amount per row: rows of random weights would
    otherwise settle on one token and one set of experts, where real users' rows differ."""
    shift = mx.random.randint(0, vocab, (logits.shape[0],))
    return ((mx.argmax(logits[:, -1, :], axis=-1) + shift) % vocab).astype(mx.int32)


def decode_steps(model, caches, n, steps, vocab):
    """Step times (s) of decode of n rows, pipelined as mlx-lm's GenerationBatch is."""
    def step(y):
        return _next_tokens(model(y[:, None], cache=caches), vocab)

    y = mx.random.randint(0, vocab, (n,)).astype(mx.int32)
    mx.async_eval(y)
    stamps = []
    for _ in range(steps):
        nxt = step(y)
        mx.async_eval(nxt)
        mx.eval(y)
        stamps.append(time.perf_counter())
        y = nxt
    mx.eval(y)
    return [b - a for a, b in zip(stamps, stamps[1:])]


def distinct_experts(model, caches, n, vocab, steps=3):
    """Mean distinct experts per MoE layer and step, from the router's choices (op by op:
    inside the compiled step the choices are not visible)."""
    seen = []
    original = SwitchGLU.__call__

    def recording(self, x, indices):
        seen.append(indices)
        return original(self, x, indices)

    SwitchGLU.__call__ = recording
    usable = (decode.usable, batch_decode.usable)
    decode.usable = batch_decode.usable = lambda *a: False
    try:
        y = mx.random.randint(0, vocab, (n,)).astype(mx.int32)
        for _ in range(steps):
            y = _next_tokens(model(y[:, None], cache=caches), vocab)
            mx.eval(y, seen)
    finally:
        SwitchGLU.__call__ = original
        decode.usable, batch_decode.usable = usable
    counts = [len(set(s.reshape(-1).tolist())) for s in seen]
    return statistics.mean(counts)


def byte_parts(impl, model, S):
    """(bytes read once per step whatever n, bytes of one routed expert of one layer, bytes of one row's cache)."""
    shared = expert = 0
    for k, v in tree_flatten(model.parameters()):
        if ".switch_mlp." in k:
            expert += v.nbytes / v.shape[0]
        elif "embed_tokens" in k:
            shared += v.nbytes / v.shape[0]
        else:
            shared += v.nbytes
    n_moe = len(bd.moe_layers(impl, model))
    row = bd.token_bytes(impl, model, S) - bd.token_bytes(impl, model, 0)
    return shared, expert / n_moe, row


def run(a):
    streams = [int(s) for s in a.streams.split(",")]
    contexts = [int(s) for s in a.contexts.split(",")]
    bw = bd.measured_bandwidth(bd.GB >> 6 if a.tiny else bd.GB)
    print(f"device={mx.default_device()} mlx={mx.__version__} bandwidth={bw / 1e9:.0f} GB/s", flush=True)
    records = []
    kv_quant = (a.kv_group_size, a.kv_bits) if a.kv_bits else None
    for impl in a.impls.split(","):
        mx.random.seed(0)
        cfg = bd.text_config(a.layers, a.tiny)
        model = bd.build(impl, cfg, a.format)
        distinct_rows(model, cfg)
        E, k, vocab = cfg["num_local_experts"], cfg["num_experts_per_tok"], cfg["vocab_size"]
        n_moe = len(bd.moe_layers(impl, model))
        for S in contexts:
            shared, expert, row = byte_parts(impl, model, S)
            if kv_quant is not None and impl == "ours":  # a quantized row reads its cache's bytes in proportion
                plain = filled_caches(impl, model, S, S)
                row *= sum(c.nbytes for c in filled_caches(impl, model, S, S, kv_quant)) / sum(c.nbytes for c in plain)
                plain = None
            one = shared + k * expert * n_moe + row
            for n in streams:
                rec = {"impl": impl, "format": a.format, "context": S, "streams": n, "layers": 3 + a.layers,
                       "kv_bits": a.kv_bits if impl == "ours" else None}
                capacity = S + a.warm + a.tokens + 16
                singles = [filled_caches(impl, model, S, capacity, kv_quant) for _ in range(n)]
                try:
                    if n == 1:
                        ms, _ = bd.time_generate(model, singles[0], a.tokens, a.warm, 1, S)
                        caches = singles[0]
                        # the same stream through the batched path (the server's default for a lone request)
                        one_row = merged([filled_caches(impl, model, S, capacity, kv_quant)])
                        deltas = decode_steps(model, one_row, 1, a.warm + a.tokens, vocab)[a.warm:]
                        rec["batch_path_ms_per_step"] = round(statistics.median(deltas) * 1e3, 3)
                        one_row = None
                    else:
                        caches = merged(singles)
                        del singles
                        deltas = decode_steps(model, caches, n, a.warm + a.tokens, vocab)[a.warm:]
                        ms = statistics.median(deltas) * 1e3
                    rec["ms_per_step"] = round(ms, 3)
                    rec["tok_s"] = round(n * 1e3 / ms, 2)
                    rec["experts_measured"] = round(distinct_experts(model, caches, n, vocab), 2)
                except Exception as e:  # e.g. a batch cache the port cannot decode with
                    rec["error"] = f"{type(e).__name__}: {e}"[:300]
                predicted = E * (1 - (1 - k / E) ** n)
                step_bytes = shared + predicted * expert * n_moe + n * row
                rec.update(experts_predicted=round(predicted, 2), bytes_per_step_gb=round(step_bytes / bd.GB, 4),
                           predicted_tok_s=round(n * bw / step_bytes, 2),
                           predicted_speedup=round(n * one / step_bytes, 3))
                records.append(rec)
                print(json.dumps(rec), flush=True)
                caches = singles = None
                gc.collect()
                mx.clear_cache()
        del model
        gc.collect()
        mx.clear_cache()
    for r in records:  # measured speedup over the same implementation's one stream
        base = next((b for b in records if b["impl"] == r["impl"] and b["context"] == r["context"]
                     and b["streams"] == 1 and "tok_s" in b), None)
        if base is not None and "tok_s" in r:
            r["speedup"] = round(r["tok_s"] / base["tok_s"], 3)
    return records, bw


def table(records):
    print(f"\n{'impl':<7}{'context':>8}{'streams':>8}{'ms/step':>9}{'tok/s':>9}{'speedup':>8}{'bound':>7}"
          f"{'pred tok/s':>11}{'experts':>8}{'pred':>6}")
    for r in records:
        f = lambda key, w, p=2: (f"{r[key]:.{p}f}" if r.get(key) is not None else "-").rjust(w)  # noqa: E731
        print(f"{r['impl']:<7}{r['context']:>8}{r['streams']:>8}{f('ms_per_step', 9)}{f('tok_s', 9)}"
              f"{f('speedup', 8)}{f('predicted_speedup', 7)}{f('predicted_tok_s', 11)}{f('experts_measured', 8, 1)}"
              f"{f('experts_predicted', 6, 1)}" + (f"  {r['error']}" if "error" in r else ""))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", default="8192,65536")
    p.add_argument("--streams", default="1,2,4,8")
    p.add_argument("--layers", type=int, default=10, help="MoE layers after the 3 dense ones")
    p.add_argument("--format", default="q4", choices=bd.FORMATS)
    p.add_argument("--impls", default="ours,mlx_lm")
    p.add_argument("--tokens", type=int, default=16, help="timed steps")
    p.add_argument("--warm", type=int, default=4)
    p.add_argument("--tiny", action="store_true", help="reduced widths (CPU smoke run)")
    p.add_argument("--kv-bits", type=int, choices=(4, 8), default=None,
                   help="quantize our caches on every layer, as the server does under --kv-bits")
    p.add_argument("--kv-group-size", type=int, default=64)
    p.add_argument("--json", help="write the records here")
    a = p.parse_args(argv)
    if a.tiny and a.contexts == "8192,65536":
        a.contexts = "256"
    records, bw = run(a)
    table(records)
    if a.json:
        Path(a.json).write_text(json.dumps({"meta": {"bandwidth_gbs": bw / 1e9, "mlx": mx.__version__,
                                                     "device": str(mx.default_device())},
                                            "records": records}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
