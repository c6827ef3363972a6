"""Component timings of the MSA main branch at the real dims, for choosing implementations.

Times each candidate for (a) the gathered attention of a prefill chunk and (b) a decode
step's pieces, in one process, so the choices in msa.py rest on measurements.
  python scripts/profile_msa.py --context 131072 --chunk 2048
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx

G, GQ, D, BS, K = 4, 16, 128, 128, 16


def timeit(fn, n=5):
    mx.eval(fn())
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        mx.eval(fn())
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--context", type=int, default=131072)
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--dtype", default="bfloat16")
    a = p.parse_args()
    dt = getattr(mx, a.dtype)
    S, L = a.context, a.chunk
    nb = S // BS
    kb = mx.random.normal((1, G, nb, BS, D)).astype(dt)
    vb = mx.random.normal((1, G, nb, BS, D)).astype(dt)
    q = mx.random.normal((1, G * GQ, L, D)).astype(dt)
    idx = mx.random.randint(0, nb - 16, (1, G, L, K)).astype(mx.int32)
    ik = mx.random.normal((1, 1, S, D)).astype(mx.float32)
    iq = mx.random.normal((1, 4, L, D)).astype(mx.float32)
    mx.eval(kb, vb, q, idx, ik, iq)
    scale = D ** -0.5
    res = {}

    def gather_tile(l0, l1, take=True):
        Lt = l1 - l0
        blk = idx[:, :, l0:l1]
        if take:
            ind = blk.reshape(1, G, Lt * K, 1, 1)
            kg, vg = mx.take_along_axis(kb, ind, axis=2), mx.take_along_axis(vb, ind, axis=2)
        else:
            hi = mx.arange(G).reshape(1, G, 1, 1)
            kg, vg = kb[0][hi[0], blk[0]][None], vb[0][hi[0], blk[0]][None]
        return kg, vg, Lt

    def attn_sdpa(l0, l1, mask=True, take=True):
        kg, vg, Lt = gather_tile(l0, l1, take)
        kg = kg.reshape(1, G, Lt, K * BS, D).transpose(0, 2, 1, 3, 4).reshape(Lt, G, K * BS, D)
        vg = vg.reshape(1, G, Lt, K * BS, D).transpose(0, 2, 1, 3, 4).reshape(Lt, G, K * BS, D)
        qt = q[:, :, l0:l1].reshape(1, G, GQ, Lt, D).transpose(0, 3, 1, 2, 4).reshape(Lt, G, GQ, D)
        m = (mx.random.uniform(shape=(Lt, G, 1, K * BS)) > 0.01) if mask else None
        return mx.fast.scaled_dot_product_attention(qt, kg, vg, scale=scale, mask=m)

    def attn_manual(l0, l1):
        # no transposes of the gathered K/V: scores via batched matmul in [G, Lt] batch order
        kg, vg, Lt = gather_tile(l0, l1)
        kg = kg.reshape(1, G, Lt, K * BS, D)
        vg = vg.reshape(1, G, Lt, K * BS, D)
        qt = q[:, :, l0:l1].reshape(1, G, GQ, Lt, D).transpose(0, 1, 3, 2, 4)  # [1,G,Lt,GQ,D]
        s = (qt @ kg.swapaxes(-1, -2)).astype(mx.float32) * scale  # [1,G,Lt,GQ,K*BS]
        m = mx.random.uniform(shape=(1, G, Lt, 1, K * BS)) > 0.01
        s = mx.where(m, s, -mx.inf)
        pr = mx.softmax(s, axis=-1).astype(dt)
        return pr @ vg

    def tiled(fn, qt_len, eval_each):
        outs = []
        for l0 in range(0, L, qt_len):
            o = fn(l0, min(L, l0 + qt_len))
            if eval_each:
                mx.eval(o)
            outs.append(o)
        return outs

    for qt_len in (64, 256):
        res[f"prefill gather+sdpa(mask) tile{qt_len} lazy"] = timeit(lambda: tiled(attn_sdpa, qt_len, False), 3)
        res[f"prefill gather+sdpa(mask) tile{qt_len} eval-each"] = timeit(lambda: tiled(attn_sdpa, qt_len, True), 3)
    res["prefill gather+sdpa(no mask) tile64 eval-each"] = timeit(
        lambda: tiled(lambda a, b: attn_sdpa(a, b, mask=False), 64, True), 3)
    res["prefill fancy-index gather+sdpa tile64 eval-each"] = timeit(
        lambda: tiled(lambda a, b: attn_sdpa(a, b, take=False), 64, True), 3)
    res["prefill gather+manual attn tile64 eval-each"] = timeit(lambda: tiled(attn_manual, 64, True), 3)
    res["prefill gather only tile64 eval-each"] = timeit(
        lambda: tiled(lambda a, b: gather_tile(a, b)[:2], 64, True), 3)
    # index branch for a chunk: per-tile scores + block max
    def index_scores(tile_keys, eval_each):
        outs = []
        for k0 in range(0, S, tile_keys):
            s = iq @ ik[:, :, k0:k0 + tile_keys].swapaxes(-1, -2)
            o = s.reshape(1, 4, L, -1, BS).max(axis=-1)
            if eval_each:
                mx.eval(o)
            outs.append(o)
        return mx.concatenate(outs, axis=-1)
    res["prefill index scores tile8192 lazy"] = timeit(lambda: index_scores(8192, False), 3)
    res["prefill index scores tile8192 eval-each"] = timeit(lambda: index_scores(8192, True), 3)
    res["prefill index scores tile32768 eval-each"] = timeit(lambda: index_scores(32768, True), 3)
    bsc = mx.random.normal((1, 4, L, nb))
    res["prefill argpartition [4,L,nb]"] = timeit(lambda: mx.argpartition(-bsc, kth=K - 1, axis=-1)[..., :K], 3)
    res["prefill dense sdpa causal (whole cache)"] = timeit(lambda: mx.fast.scaled_dot_product_attention(
        q, kb.reshape(1, G, S, D), vb.reshape(1, G, S, D), scale=scale, mask="causal"), 3)

    # decode pieces (L = 1)
    q1 = q[:, :, :1]
    iq1 = iq[:, :, :1]
    res["decode index matmul f32 keys"] = timeit(lambda: iq1 @ ik.swapaxes(-1, -2), 20)
    ikb = ik.astype(dt)
    mx.eval(ikb)
    res["decode index matmul bf16 keys"] = timeit(lambda: iq1.astype(dt) @ ikb.swapaxes(-1, -2), 20)
    res["decode index scores+max f32"] = timeit(lambda: (iq1 @ ik.swapaxes(-1, -2)).reshape(1, 4, 1, nb, BS).max(-1), 20)
    b1 = mx.random.normal((1, 4, 1, nb))
    res["decode argpartition"] = timeit(lambda: mx.argpartition(-b1, kth=K - 1, axis=-1)[..., :K], 20)
    i1 = idx[:, :, :1]
    res["decode gather take_along"] = timeit(lambda: mx.take_along_axis(kb, i1.reshape(1, G, K, 1, 1), axis=2), 20)
    kg = mx.take_along_axis(kb, i1.reshape(1, G, K, 1, 1), axis=2).reshape(1, G, K * BS, D)
    vg = mx.take_along_axis(vb, i1.reshape(1, G, K, 1, 1), axis=2).reshape(1, G, K * BS, D)
    mx.eval(kg, vg)
    m1 = mx.random.uniform(shape=(1, G, 1, K * BS)) > 0.01
    res["decode sdpa folded Gq mask"] = timeit(lambda: mx.fast.scaled_dot_product_attention(
        q1.reshape(1, G, GQ, D), kg, vg, scale=scale, mask=m1), 20)
    res["decode sdpa gqa no mask"] = timeit(lambda: mx.fast.scaled_dot_product_attention(
        q1, kg, vg, scale=scale), 20)
    res["decode sdpa dense whole cache"] = timeit(lambda: mx.fast.scaled_dot_product_attention(
        q1, kb.reshape(1, G, S, D), vb.reshape(1, G, S, D), scale=scale), 20)
    kbig = mx.zeros((1, G, S + 4096, D), dt)
    kbig[:, :, :S] = kb.reshape(1, G, S, D)
    mx.eval(kbig)
    res["decode sdpa dense over sliced buffer"] = timeit(lambda: mx.fast.scaled_dot_product_attention(
        q1, kbig[:, :, :S], kbig[:, :, :S], scale=scale), 20)
    res["empty op (launch overhead)"] = timeit(lambda: q1 + 1, 50)
    print(f"\ncontext {S}, chunk {L}, {a.dtype}, {mx.default_device()}")
    for k, v in res.items():
        print(f"{k:<55}{v:10.3f} ms")


if __name__ == "__main__":
    main()
