"""Time each piece of our sparse decode step on the current backend (real code paths)."""
import statistics, sys, time
import mlx.core as mx
sys.path.insert(0, ".")
import minimax_m3_mlx.model.msa as msa
from scripts.bench_msa import make_cache, our_layer

def timeit(fn, n=20):
    mx.eval(fn()); ts = []
    for _ in range(n):
        t0 = time.perf_counter(); mx.eval(fn()); ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3

dt = mx.bfloat16
S = int(sys.argv[1]) if len(sys.argv) > 1 else 131072
layer = our_layer(dt, True, "float32")[0]; mx.eval(layer.parameters())
cache = make_cache("ours", S - 1, S + 300, dt, "float32")
x = (mx.random.normal((1, 1, 6144)) * 0.5).astype(dt); mx.eval(x)
off = S - 1
res = {}
res["sync only (eval of a ready array)"] = timeit(lambda: x)
def qkv():
    B, L = 1, 1
    q = layer.q_norm(layer.q_proj(x).reshape(B, L, 64, -1)).transpose(0, 2, 1, 3)
    k = layer.k_norm(layer.k_proj(x).reshape(B, L, 4, -1)).transpose(0, 2, 1, 3)
    v = layer.v_proj(x).reshape(B, L, 4, -1).transpose(0, 2, 1, 3)
    return layer.rope(q, offset=off), layer.rope(k, offset=off), v
res["q/k/v proj+norm+rope"] = timeit(qkv)
res["indexer proj+norm+rope"] = timeit(lambda: layer.indexer(x, off))
q, k, v = qkv(); iq, ik = layer.indexer(x, off); mx.eval(q, k, v, iq, ik)
def upd():
    cache.update_index(ik); cache.update_and_fetch(k, v); cache.offset -= 1
    return cache.keys, cache.values, cache.index_keys
res["cache updates (3 writes)"] = timeit(upd)
res["index_block_scores (prefill path)"] = timeit(lambda: msa.index_block_scores(iq, cache.index_keys, off, 128))
step = msa.compiled_decode_step(0.088, 128, 16, 1)
pos = mx.array(off, dtype=mx.int32)
res["compiled step (scores+select+gather+sdpa)"] = timeit(lambda: step(q, iq, cache.keys, cache.values, cache.index_keys, pos))
res["  uncompiled, same function"] = timeit(lambda: msa._decode_step(q, iq, cache.keys, cache.values, cache.index_keys, pos,
                                                                      scale=0.088, block_size=128, topk=16, local_blocks=1))
res["o_proj"] = timeit(lambda: layer.o_proj(q.reshape(1, 1, -1)))
def whole():
    out = layer(x, cache=cache); cache.offset -= 1; return out
res["whole layer"] = timeit(whole)
print(f"\n{mx.default_device()} S={S}")
for k_, v_ in res.items():
    print(f"{k_:<45}{v_:10.3f} ms")
