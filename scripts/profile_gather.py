"""Gather and index-GEMV variants on the current backend (see profile_msa.py)."""
import statistics, sys, time
import mlx.core as mx
G, GQ, D, BS, K = 4, 16, 128, 128, 16

def timeit(fn, n=5):
    mx.eval(fn()); ts = []
    for _ in range(n):
        t0 = time.perf_counter(); mx.eval(fn()); ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3

S, L = int(sys.argv[1]), int(sys.argv[2])
dt = mx.bfloat16
nb = S // BS
kb = mx.random.normal((1, G, nb, BS, D)).astype(dt)
idx = mx.random.randint(0, nb, (1, G, L, K)).astype(mx.int32)
mx.eval(kb, idx)
res = {}
res["take_along_axis 5d"] = timeit(lambda: mx.take_along_axis(kb, idx.reshape(1, G, L * K, 1, 1), axis=2))
k2 = kb.reshape(G * nb, BS * D)
ids = (idx + (mx.arange(G) * nb).reshape(1, G, 1, 1)).transpose(0, 2, 1, 3).reshape(-1)
mx.eval(ids)
res["take rows 2d (ids precomputed)"] = timeit(lambda: mx.take(k2, ids, axis=0))
res["take rows 2d + id arithmetic"] = timeit(lambda: mx.take(k2, (idx + (mx.arange(G) * nb).reshape(1, G, 1, 1)).transpose(0, 2, 1, 3).reshape(-1), axis=0))
res["fancy index rows 2d"] = timeit(lambda: k2[ids])
k3 = kb.reshape(G * nb, BS, D)
res["take rows 3d [n,bs,D]"] = timeit(lambda: mx.take(k3, ids, axis=0))
k2u = kb.reshape(G * nb, BS * D // 2).view(mx.uint32) if False else kb.view(mx.uint32).reshape(G * nb, BS * D // 2)
mx.eval(k2u)
res["take rows 2d as uint32"] = timeit(lambda: mx.take(k2u, ids, axis=0))
gb = L * K * BS * D * G * 2 / 1e9
res = {f"{k}  [{gb / v * 1e3:.0f} GB/s]": v for k, v in res.items()}
# index GEMV orientations at decode
ik = mx.random.normal((1, 1, S, D)).astype(mx.float32)
iq = mx.random.normal((1, 4, 1, D)).astype(mx.float32)
ikb = ik.astype(dt); mx.eval(ik, iq, ikb)
res["idx q@k^T f32"] = timeit(lambda: iq @ ik.swapaxes(-1, -2), 20)
res["idx k@q^T f32"] = timeit(lambda: ik[0, 0] @ iq[0, :, 0].T, 20)
res["idx k@q^T f32 + blockmax"] = timeit(lambda: (ik[0, 0] @ iq[0, :, 0].T).reshape(nb, BS, 4).max(axis=1), 20)
res["idx q@k^T bf16"] = timeit(lambda: iq.astype(dt) @ ikb.swapaxes(-1, -2), 20)
res["idx k@q^T bf16"] = timeit(lambda: ikb[0, 0] @ iq[0, :, 0].T.astype(dt), 20)
iqL = mx.random.normal((1, 4, L, D)).astype(mx.float32); mx.eval(iqL)
res["idx prefill q@k^T f32 tile 32768"] = timeit(lambda: iqL @ ik[:, :, :32768].swapaxes(-1, -2), 5)
res["idx prefill k@q^T f32 tile 32768"] = timeit(lambda: ik[0, 0, :32768] @ iqL[0].reshape(4 * L, D).T, 5)
# dense layer decode pieces: in-place cache write then SDPA over the slice
cap = S + 1024
kc = mx.zeros((1, G, cap, D), dt); vc = mx.zeros((1, G, cap, D), dt); mx.eval(kc, vc)
q1 = mx.random.normal((1, 64, 1, D)).astype(dt); k1 = mx.random.normal((1, G, 1, D)).astype(dt); mx.eval(q1, k1)
state = {"k": kc, "v": vc, "off": S - 10}
del kc, vc
def step():
    o = state["off"]
    state["k"][..., o:o + 1, :] = k1
    state["v"][..., o:o + 1, :] = k1
    state["off"] = o + 1 if o + 1 < cap - 1 else S - 10
    return mx.fast.scaled_dot_product_attention(q1, state["k"][..., :o + 1, :], state["v"][..., :o + 1, :], scale=0.1)
res["dense step: slice write + sdpa over slice"] = timeit(step, 10)
def step_eval():
    out = step(); mx.eval(out, state["k"], state["v"]); return out
res["dense step, eval cache too"] = timeit(step_eval, 10)
print(f"\ncontext {S}, chunk {L}, {mx.default_device()}")
for k, v in res.items():
    print(f"{k:<60}{v:10.3f} ms")
