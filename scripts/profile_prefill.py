"""One MSA prefill chunk's attention (selection given), three ways, at the real head dims.

  gather      msa.sparse_attention: each query's selected blocks gathered, then SDPA
  group_mask  dense SDPA with each KV group as a batch entry (its 16 query heads share one
              [L, C] block mask, so the mask is G x L x C booleans, not Hq x L x S)
  dense       causal SDPA over the whole cache (not the same model; the speed reference)

  python scripts/profile_prefill.py --contexts 16384,131072
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minimax_m3_mlx.model import msa  # noqa: E402


def group_masked_attention(q, keys_buf, values_buf, idx, valid, offset, scale, block_size,
                           index_head_of_group=None, kv_head_of_group=None):
    """The same attention as msa.sparse_attention, computed densely under the selection's mask.

    Each selection group becomes one batch entry of SDPA with its one KV head, so its Gq
    query heads share one [L, C] mask: G x L x C booleans instead of the reference's
    Hq x L x S (16x fewer), and MLX's fused attention reads each key once per chunk
    instead of once per selecting query. Masked slots get exactly zero weight, so this
    is the selection's attention, not an approximation.
    """
    B, Hq, L, D = q.shape
    C = keys_buf.shape[2]
    G = idx.shape[1] if index_head_of_group is None else len(index_head_of_group)
    Gq = Hq // G
    nb = C // block_size
    if index_head_of_group is not None and index_head_of_group != list(range(idx.shape[1])):
        sel = mx.array(index_head_of_group)
        idx, valid = idx[:, sel], valid[:, sel]
    kept = mx.put_along_axis(mx.zeros((B, G, L, nb), mx.bool_), idx, valid, axis=-1)
    kept = mx.broadcast_to(kept[..., None], (B, G, L, nb, block_size)).reshape(B, G, L, C)
    causal = mx.arange(C)[None, :] <= mx.arange(offset, offset + L)[:, None]
    mask = (kept & causal).reshape(B * G, 1, L, C)
    if kv_head_of_group is not None and kv_head_of_group != list(range(keys_buf.shape[1])):
        heads = mx.array(kv_head_of_group)
        keys_buf, values_buf = keys_buf[:, heads], values_buf[:, heads]
    kg = keys_buf.reshape(B * G, 1, C, D)
    vg = values_buf.reshape(B * G, 1, C, values_buf.shape[-1])
    o = mx.fast.scaled_dot_product_attention(q.reshape(B * G, Gq, L, D), kg, vg, scale=scale, mask=mask)
    return o.reshape(B, Hq, L, -1).transpose(0, 2, 1, 3)


def timed(fn, steps):
    mx.eval(fn())
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter()
        mx.eval(fn())
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--contexts", default="16384,131072")
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tiny", action="store_true")
    a = p.parse_args()
    dt = getattr(mx, a.dtype)
    Hq, G, D, bs, topk = (8, 2, 16, 8, 4) if a.tiny else (64, 4, 128, 128, 16)
    L = a.chunk
    rows = []
    for S in (int(s) for s in a.contexts.split(",")):
        C = -(-(S + 256) // 256) * 256
        offset = S - L
        mx.random.seed(0)
        q = mx.random.normal((1, Hq, L, D)).astype(dt)
        kb = mx.random.normal((1, G, C, D)).astype(dt)
        vb = mx.random.normal((1, G, C, D)).astype(dt)
        iq = mx.random.normal((1, G, L, D)).astype(mx.float32)
        ik = mx.random.normal((1, 1, C, D)).astype(mx.float32)
        mx.eval(q, kb, vb, iq, ik)
        scores = msa.index_block_scores(iq, ik, offset, bs)
        idx, valid = msa.select_blocks(scores, offset, bs, topk, 1)
        mx.eval(idx, valid)
        g_of = list(range(G))
        scale = D ** -0.5
        gather = lambda: msa.sparse_attention(q, kb, vb, idx, valid, offset, scale, bs, g_of, g_of)  # noqa: E731
        group = lambda: group_masked_attention(q, kb, vb, idx, valid, offset, scale, bs)  # noqa: E731
        dense = lambda: msa.dense_attention(q, kb[..., :S, :], vb[..., :S, :], scale)  # noqa: E731
        rec = {"context": S}
        ref = gather()
        mx.eval(ref)
        for name, fn in (("gather", gather), ("group_mask", group), ("dense", dense)):
            mx.clear_cache()
            base = mx.get_active_memory()
            mx.reset_peak_memory()
            try:
                rec[name] = round(timed(fn, a.steps), 2)
                rec[name + "_extra_gb"] = round((mx.get_peak_memory() - base) / 2**30, 2)
            except Exception as e:
                rec[name] = f"{type(e).__name__}: {e}"[:120]
        out = group()
        rec["group_vs_gather_rel_err"] = float(mx.linalg.norm((out - ref).astype(mx.float32).flatten())
                                               / mx.linalg.norm(ref.astype(mx.float32).flatten()))
        rows.append(rec)
        print(rec, flush=True)


if __name__ == "__main__":
    main()
