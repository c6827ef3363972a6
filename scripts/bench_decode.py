"""The whole MiniMax-M3 text model at the real widths: decode and prefill, ours vs mlx-lm's port.

The model is configs/minimax_m3.json with fewer layers: its 3 dense full-attention layers,
then N MoE layers with sparse attention (the kind 57 of the real 60 are), the real
vocabulary, embeddings and lm_head. Weights are random but laid out as a converted model
holds them (nn.quantize with the model's quant_predicate, then random packed words,
scales and biases): `q4` = 4-bit affine g64, `mac-256gb` = the recipe (3-bit experts,
6-bit rest), `mxfp8`. Caches are filled to S directly (random K/V/index keys, offset S),
not by a prefill. For each implementation (ours, mlx-lm 0.32.2's `minimax_m3_vl`, whose
cache is a CacheList of KVCaches per layer), format and context, in one process:

  decode     ms/token through mlx-lm's generate_step (async pipelining as users get it),
             median after a warm-up, at two layer counts -> ms/layer slope, fixed part,
             and the extrapolated 60-layer ms/token and tok/s
  floor      one MoE layer's quantized matmuls alone, compiled, in one eval: q/k/v/o,
             index q/k, router, routed experts on fixed ids (gather_qmm), shared expert
  layer      the isolated step of one MoE layer (build + eval, cache rewound each time)
  prefill    one 2048-token chunk through the whole model ending at S
  peak_gb    peak memory of the run so far; bound_ms: the bytes a token must read over the
             copy bandwidth measured in-process

  python scripts/bench_decode.py --contexts 4096,32768 --layers 2,6 --json out.json
  python scripts/bench_decode.py --tiny            # reduced widths: a CPU smoke run
  python scripts/bench_decode.py --profile ...     # one MoE layer's step split into parts
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

ROOT = Path(__file__).resolve().parents[1]
# BENCH_PACKAGE_ROOT: time another copy of the package (e.g. the code before a change)
# with this script, in the same session.
sys.path.insert(0, os.environ.get("BENCH_PACKAGE_ROOT", str(ROOT)))

from minimax_m3_mlx.config import ModelArgs  # noqa: E402
from minimax_m3_mlx.model import Model  # noqa: E402

try:
    from minimax_m3_mlx.convert import recipes
    from minimax_m3_mlx.model.cache import SparseKVCache
    from minimax_m3_mlx.model import kvquant
except ImportError:  # the flat layout before the package was layered (BENCH_PACKAGE_ROOT)
    from minimax_m3_mlx import recipes
    from minimax_m3_mlx.cache import SparseKVCache
from mlx_lm.models.cache import CacheList, KVCache  # noqa: E402
from mlx_lm.models.switch_layers import QuantizedSwitchLinear  # noqa: E402

GB = 1 << 30
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=64, dense_intermediate_size=256,
            shared_intermediate_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
            rotary_dim=16, num_local_experts=8, num_experts_per_tok=2,
            sparse_attention_config=dict(sparse_num_index_heads=2, sparse_index_dim=32, sparse_block_size=8,
                                         sparse_topk_blocks=4, sparse_local_block=1))
FORMATS = ("q4", "mac-256gb", "mxfp8")


# -- the model -------------------------------------------------------------------------------
def text_config(n_moe: int, tiny: bool, n_dense: int = 3) -> dict:
    cfg = dict(json.loads((ROOT / "minimax_m3_mlx/configs/minimax_m3.json").read_text())["text_config"])
    if tiny:
        cfg.update({k: v for k, v in TINY.items() if k != "sparse_attention_config"})
        cfg["sparse_attention_config"] = dict(TINY["sparse_attention_config"])
    n = n_dense + n_moe
    freq = [0] * n_dense + [1] * n_moe
    cfg["num_hidden_layers"] = n
    cfg["moe_layer_freq"] = freq
    cfg["sparse_attention_config"] = {**cfg["sparse_attention_config"], "sparse_attention_freq": freq}
    cfg["max_position_embeddings"] = 1 << 22  # room for 1M + generated tokens
    return cfg


def _lm_path(path: str) -> str:
    """mlx-lm's module path -> ours, for the recipe's categories."""
    return path.replace(".block_sparse_moe.", ".mlp.").replace("self_attn.index_q_proj", "self_attn.indexer.q_proj") \
        .replace("self_attn.index_k_proj", "self_attn.indexer.k_proj")


def quant_predicate(fmt: str, impl: str, model):
    policy = recipes.RECIPES["mac-256gb"] if fmt == "mac-256gb" else None
    spec = {"q4": dict(group_size=64, bits=4, mode="affine"),
            "mxfp8": dict(group_size=32, bits=8, mode="mxfp8")}.get(fmt)
    own = model.quant_predicate

    def pred(path, module):
        ok = own(path, module)
        if not ok or not hasattr(module, "to_quantized"):
            return False
        if impl == "mlx_lm" and isinstance(ok, dict):  # its router: 8-bit, as mlx-lm converts it
            return ok
        if policy is not None:
            s = policy.spec_for(_lm_path(path) if impl == "mlx_lm" else path, module.weight.shape[-1])
            return s.as_config() if s is not None else False
        return dict(spec) if module.weight.shape[-1] % spec["group_size"] == 0 else False

    return pred


def build(impl: str, cfg: dict, fmt: str, dtype=mx.bfloat16, seed: int = 0):
    """A model with random weights in the layout a converted checkpoint gives (lazy until eval)."""
    if impl == "ours":
        model = Model(ModelArgs.from_dict({"model_type": "minimax_m3_vl", "text_config": cfg}))
    else:
        from mlx_lm.models.minimax_m3_vl import Model as LmModel, ModelArgs as LmArgs

        model = LmModel(LmArgs.from_dict({"model_type": "minimax_m3_vl", "text_config": cfg}))
    model.set_dtype(dtype)
    keep = model.cast_predicate  # the router's bias stays float32, as loading keeps it
    model.update(tree_unflatten([(k, v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())
                                 if not keep(k)]))
    nn.quantize(model, class_predicate=quant_predicate(fmt, impl, model))
    mx.random.seed(seed)
    quantized = (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear)
    for path, m in model.named_modules():
        if isinstance(m, quantized):
            _randomize_quantized(m, dtype)
        elif isinstance(m.get("weight"), mx.array) and mx.issubdtype(m.weight.dtype, mx.floating):
            m.weight = (mx.random.normal(m.weight.shape) * (0.02 if m.weight.ndim == 2 else 0.1)).astype(m.weight.dtype)
    for layer in model.layers:  # one layer at a time: the lazy init graphs stay small
        mx.eval(layer.parameters())
    mx.eval(model.parameters())
    return model


def _random_words(shape):
    return mx.random.randint(-(1 << 31), (1 << 31) - 1, shape, dtype=mx.int32).view(mx.uint32)


def _randomize_quantized(m, dtype):
    shape, n_in = m.weight.shape, m.weight.shape[-1] * 32 // m.bits
    if m.mode == "affine":
        m.weight = _random_words(shape)
        scale = 1.0 / ((1 << m.bits) * n_in**0.5)
        m.scales = (mx.random.uniform(0.5, 1.5, m.scales.shape) * scale).astype(dtype)
        m.biases = (-m.scales.astype(mx.float32) * ((1 << m.bits) - 1) / 2).astype(dtype)
    else:  # microscaling: e4m3 bytes with no NaN patterns, E8M0 scales near 2^-5
        m.weight = _random_words(shape) & 0x6E6E6E6E
        m.scales = mx.random.randint(118, 124, m.scales.shape).astype(mx.uint8)


def set_layer_count(impl, model, n_layers, all_layers):
    tm = model.language_model.model
    tm.layers = all_layers[:n_layers]
    if impl == "ours":
        model.args.num_hidden_layers = n_layers


# -- caches ------------------------------------------------------------------------------------
def make_caches(impl, model, S, capacity, dtype=mx.bfloat16, kv_quant=None):
    """The model's own caches, filled to S with random keys/values (capacity slots allocated);
    kv_quant = (group_size, bits): then quantized as mlx-lm's --kv-bits does (every layer)."""
    caches = model.make_cache()
    for c in caches:
        for sub in (c.caches if isinstance(c, CacheList) else [c]):
            _fill(sub, S, capacity, dtype, model)
    if kv_quant is not None:
        caches = [c.to_quantized(*kv_quant) for c in caches]
    mx.eval([_arrays(c) for c in caches])
    return caches


def _dims(model):
    a = model.args if hasattr(model.args, "index_head_dim") else model.args.text_config
    return a.num_key_value_heads, a.head_dim, a.index_head_dim, a.index_block_size


def _fill(c, S, capacity, dtype, model):
    Hkv, D, Di, bs = _dims(model)
    if isinstance(c, SparseKVCache):
        cap = -(-capacity // c.step) * c.step
        c.keys = mx.random.normal((1, Hkv, cap, D)).astype(dtype)
        c.values = mx.random.normal((1, Hkv, cap, D)).astype(dtype)
        idt = getattr(mx, c.index_dtype) if c.index_dtype else dtype
        c.index_keys = mx.random.normal((1, 1, cap, Di)).astype(idt)
    else:
        cap = -(-capacity // c.step) * c.step
        # mlx-lm's port keeps its index keys in a second KVCache with empty values.
        index = getattr(c, "_index_slot", False)
        c.keys = mx.random.normal((1, 1 if index else Hkv, cap, Di if index else D)).astype(dtype)
        c.values = mx.zeros((1, 1, cap, 0), dtype) if index else mx.random.normal((1, Hkv, cap, D)).astype(dtype)
    c.offset = S


def _arrays(c):
    subs = c.caches if isinstance(c, CacheList) else [c]
    out = []
    for s in subs:
        out += [a for a in (s.keys, s.values, getattr(s, "index_keys", None)) if a is not None]
    return out


def set_offset(caches, S):
    for c in caches:
        for sub in (c.caches if isinstance(c, CacheList) else [c]):
            sub.offset = S


def lm_make_cache(model):
    caches = model.make_cache()
    for c in caches:
        if len(c.caches) == 2:
            c.caches[1]._index_slot = True
    return caches


# -- measurements ------------------------------------------------------------------------------
def median_ms(fn, steps, warm=2):
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def time_generate(model, caches, tokens, warm, repeats, S):
    """Median ms between tokens of generate_step, the best of `repeats` runs from context S."""
    from mlx_lm.generate import generate_step

    medians, spread = [], []
    for _ in range(repeats):
        set_offset(caches, S)
        stamps = []
        for _, _ in generate_step(mx.array([1], dtype=mx.int32), model, max_tokens=warm + tokens,
                                  prompt_cache=caches):
            stamps.append(time.perf_counter())
        deltas = [b - a for a, b in zip(stamps, stamps[1:])][warm:]
        medians.append(statistics.median(deltas) * 1e3)
        q = sorted(deltas)
        spread.append((round(q[len(q) // 10] * 1e3, 3), round(q[-1 - len(q) // 10] * 1e3, 3)))
    best = min(range(repeats), key=lambda i: medians[i])
    return medians[best], {"medians": [round(m, 3) for m in medians], "p10_p90": spread[best]}


def moe_layers(impl, model):
    return [l for l in model.layers if l.is_moe]


def floor_parts(impl, layer, hidden):
    """The quantized (and router) matmuls of one MoE layer, on fixed expert ids."""
    a = layer.self_attn
    m = layer.mlp if impl == "ours" else layer.block_sparse_moe
    sw = m.switch_mlp
    n_exp = sw.gate_proj.weight.shape[0]
    k = layer_topk(impl, layer)
    x = (mx.random.normal((1, 1, hidden)) * 0.5).astype(mx.bfloat16)
    xo = (mx.random.normal((1, 1, a.o_proj.weight.shape[-1] * 32 // a.o_proj.bits)) * 0.5).astype(mx.bfloat16)
    inter = sw.down_proj.weight.shape[-1] * 32 // sw.down_proj.bits
    xe = mx.expand_dims(x, (-2, -3))
    he = (mx.random.normal((1, 1, k, 1, inter)) * 0.5).astype(mx.bfloat16)
    hs = (mx.random.normal((1, 1, m.shared_experts.down_proj.weight.shape[-1] * 32
                            // m.shared_experts.down_proj.bits)) * 0.5).astype(mx.bfloat16)
    ids = mx.array([[[(i * 37) % n_exp for i in range(k)]]], dtype=mx.uint32)
    mx.eval(x, xo, xe, he, hs, ids)
    if impl == "ours":
        index = [a.indexer.q_proj, a.indexer.k_proj]
        router = lambda: x.astype(m.gate.weight.dtype) @ m.gate.weight.T  # noqa: E731
    else:
        index = [a.index_q_proj, a.index_k_proj]
        router = lambda: m.gate(x)  # noqa: E731
    se = m.shared_experts

    def parts():
        return ([p(x) for p in (a.q_proj, a.k_proj, a.v_proj, *index)] + [a.o_proj(xo), router()]
                + [sw.gate_proj(xe, ids), sw.up_proj(xe, ids), sw.down_proj(he, ids)]
                + [se.gate_proj(x), se.up_proj(x), se.down_proj(hs)])

    return parts


def fused_floor_parts(impl, layer, hidden):
    """The same matmuls with q/k/v/index q/k as one projection and expert gate+up as one
    gather_qmm (the weights concatenated along the output axis: exactly the same products)."""
    a = layer.self_attn
    m = layer.mlp if impl == "ours" else layer.block_sparse_moe
    sw, se = m.switch_mlp, m.shared_experts
    proj = [a.q_proj, a.k_proj, a.v_proj] + ([a.indexer.q_proj, a.indexer.k_proj] if impl == "ours"
                                             else [a.index_q_proj, a.index_k_proj])
    if len({(p.bits, p.group_size, p.mode) for p in proj}) != 1:
        return None
    cat = lambda mods, name, axis: (mx.concatenate([getattr(p, name) for p in mods], axis=axis)  # noqa: E731
                                    if getattr(mods[0], name, None) is not None else None)
    qkv = [cat(proj, n, 0) for n in ("weight", "scales", "biases")]
    gu = [cat([sw.gate_proj, sw.up_proj], n, 1) for n in ("weight", "scales", "biases")]
    sgu = [cat([se.gate_proj, se.up_proj], n, 0) for n in ("weight", "scales", "biases")]
    mx.eval(qkv, gu, sgu)
    p0, s0 = proj[0], sw.gate_proj
    plain = floor_parts(impl, layer, hidden)
    k = layer_topk(impl, layer)
    x = (mx.random.normal((1, 1, hidden)) * 0.5).astype(mx.bfloat16)
    xe = mx.expand_dims(x, (-2, -3))
    ids = mx.array([[[(i * 37) % sw.gate_proj.weight.shape[0] for i in range(k)]]], dtype=mx.uint32)
    mx.eval(x, xe, ids)
    kw = lambda mod: dict(transpose=True, group_size=mod.group_size, bits=mod.bits, mode=mod.mode)  # noqa: E731

    def parts():
        rest = plain()
        return [mx.quantized_matmul(x, *qkv, **kw(p0)), rest[5], rest[6],
                mx.gather_qmm(xe, *gu, rhs_indices=ids, **kw(s0)), rest[9],
                mx.quantized_matmul(x, *sgu, **kw(se.gate_proj)), rest[12]]

    return parts


def layer_topk(impl, layer):
    m = layer.mlp if impl == "ours" else layer.block_sparse_moe
    return m.gate.top_k if impl == "ours" else m.num_experts_per_tok


def token_bytes(impl, model, S):
    """Bytes one decode token must read: weights it uses + the cache it must touch."""
    total = 0
    params = dict(tree_flatten(model.parameters()))
    for k, v in params.items():
        if ".switch_mlp." in k:
            n_exp = v.shape[0]
            total += v.nbytes * model_topk(impl, model) // n_exp
        elif "embed_tokens" in k:
            total += v.nbytes // v.shape[0]  # one row
        else:
            total += v.nbytes
    Hkv, D, Di, bs = _dims(model)
    topk = (model.args if impl == "ours" else model.args.text_config).index_topk_blocks
    for layer in model.layers:
        sparse = layer.self_attn.is_sparse if impl == "ours" else layer.self_attn.is_sparse_attn
        if sparse:
            total += S * Di * 4 + min(S, topk * bs) * Hkv * D * 2 * 2
        else:
            total += S * Hkv * D * 2 * 2
    return total


def model_topk(impl, model):
    return layer_topk(impl, moe_layers(impl, model)[0])


def measured_bandwidth(nbytes=GB):
    x = mx.random.uniform(shape=(nbytes // 4,))
    mx.eval(x)
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        mx.eval(x + 1.0)
        ts.append(time.perf_counter() - t0)
    del x
    mx.clear_cache()
    return 2 * nbytes / min(ts)


def layer_step(impl, layer, cache, x, S):
    def once():
        out = layer(x, None, cache) if impl == "mlx_lm" else layer(x, cache)
        mx.eval(out)
        set_offset([cache], S)

    return once


def prefill_chunk(impl, model, caches, chunk, S, vocab):
    toks = mx.random.randint(0, vocab, (1, chunk)).astype(mx.int32)

    def once():
        set_offset(caches, S - chunk)
        model(toks, cache=caches)
        mx.eval([c.state for c in caches])

    return once


# -- kernel count (backend-neutral proxy) ---------------------------------------------------------
VIEWS = {"Broadcast", "Reshape", "Transpose", "Slice", "ExpandDims", "Squeeze", "StopGradient", "AsStrided",
         "Depends", "Copy", "Contiguous"}


def kernel_count(fn):
    """Primitives in the graph of fn()'s outputs, views excluded (each launches a kernel)."""
    import re
    import tempfile

    outs = fn()
    with tempfile.NamedTemporaryFile("r", suffix=".dot") as f:
        mx.export_to_dot(f.name, *(outs if isinstance(outs, (list, tuple)) else [outs]))
        labels = re.findall(r'label ="([^"]+)"', f.read())
    mx.eval(outs)
    counts = {}
    for name in labels:
        if name not in VIEWS:
            counts[name] = counts.get(name, 0) + 1
    return sum(counts.values()), counts


# -- profile ----------------------------------------------------------------------------------------
def profile_parts(layer, cache, x, S, steps):
    """Our MoE layer's decode step split into its parts, each built and evaluated alone."""
    msa = sys.modules[type(layer.self_attn).__module__].msa

    a, m = layer.self_attn, layer.mlp
    B = 1
    res = {}
    t = lambda fn: round(median_ms(lambda: mx.eval(fn()), steps), 4)  # noqa: E731
    res["sync only (eval of a ready array)"] = t(lambda: x)
    h = layer.input_layernorm(x)
    mx.eval(h)
    res["input norm"] = t(lambda: layer.input_layernorm(x))

    def qkv():
        q = a.q_norm(a.q_proj(h).reshape(B, 1, a.n_heads, -1)).transpose(0, 2, 1, 3)
        k = a.k_norm(a.k_proj(h).reshape(B, 1, a.n_kv_heads, -1)).transpose(0, 2, 1, 3)
        v = a.v_proj(h).reshape(B, 1, a.n_kv_heads, -1).transpose(0, 2, 1, 3)
        return a.rope(q, offset=S), a.rope(k, offset=S), v

    res["q/k/v proj+norm+rope"] = t(qkv)
    res["index q/k proj+norm+rope"] = t(lambda: a.indexer(h, S))
    q, k, v = qkv()
    iq, ik = a.indexer(h, S)
    mx.eval(q, k, v, iq, ik)

    def upd():
        cache.update_index(ik)
        cache.update_and_fetch(k, v)
        cache.offset = S
        return cache.keys, cache.values, cache.index_keys

    res["cache writes"] = t(upd)
    step = msa.compiled_decode_step(a.scale, a.block_size, a.topk, a.local_blocks)
    pos = mx.array(S, dtype=mx.int32)
    res["attention step (compiled)"] = t(lambda: step(q, iq, cache.keys, cache.values, cache.index_keys, pos))
    o = step(q, iq, cache.keys, cache.values, cache.index_keys, pos)
    mx.eval(o)
    res["o_proj + residual"] = t(lambda: x + a.o_proj(o.reshape(B, 1, -1)))
    res["post norm"] = t(lambda: layer.post_attention_layernorm(x))
    res["router"] = t(lambda: m.gate(h))
    inds, w = m.gate(h)
    mx.eval(inds, w)
    res["routed experts (SwitchGLU)"] = t(lambda: m.switch_mlp(h, inds))
    res["shared expert"] = t(lambda: m.shared_experts(h))
    res["whole MoE block"] = t(lambda: m(h))
    # the index scoring inside the attention step, alone and in another matmul layout
    keys = cache.index_keys
    G = iq.shape[1]
    res["index scores matmul [B,G,1,D]@[B,1,D,C]"] = t(lambda: iq.astype(keys.dtype) @ keys.swapaxes(-1, -2))
    res["index scores matmul [G,D]@[D,C]"] = t(lambda: iq.astype(keys.dtype).reshape(G, -1) @ keys[0, 0].T)
    res["index scores + block max"] = t(lambda: (iq.astype(keys.dtype) @ keys.swapaxes(-1, -2))
                                        .reshape(1, G, -1, a.block_size).max(axis=-1))
    decode = sys.modules.get(type(layer).__module__.rpartition(".")[0] + ".decode")  # None before decode.py
    if decode is not None:
        decode.step(layer, x, cache)  # trace
        cache.offset = S
        pre, post = layer.__dict__["_decode_fns"]
        pos = decode.position(S)
        res["compiled pre (norm, projections, QK norms, RoPE)"] = t(lambda: pre(x, pos))
        res["compiled post (o_proj, norm, MoE, residuals)"] = t(lambda: post(x, o))
    res["whole layer"] = round(median_ms(layer_step("ours", layer, cache, x, S), steps), 4)
    return res


def dense_variants(layer, cache, S, steps):
    """A full-attention layer's decode attention over its KVCache, three ways."""
    a = layer.self_attn
    Hkv, D = cache.keys.shape[1], cache.keys.shape[3]
    q = mx.random.normal((1, a.n_heads, 1, D)).astype(cache.keys.dtype)
    k, v = cache.keys[..., :S, :], cache.values[..., :S, :]
    mask = (mx.arange(cache.keys.shape[2]) < S).reshape(1, 1, 1, -1)
    mx.eval(q, mask)
    sdpa = mx.fast.scaled_dot_product_attention
    t = lambda fn: round(median_ms(lambda: mx.eval(fn()), steps), 4)  # noqa: E731
    g = a.n_heads // Hkv
    return {"dense attn: SDPA on keys[..., :S, :] view": t(lambda: sdpa(q, k, v, scale=a.scale)),
            "dense attn: SDPA on whole buffer + mask": t(lambda: sdpa(q, cache.keys, cache.values, scale=a.scale,
                                                                     mask=mask)),
            "dense attn: one SDPA per KV head": t(lambda: [sdpa(q[:, h * g:(h + 1) * g], k[:, h:h + 1],
                                                                v[:, h:h + 1], scale=a.scale) for h in range(Hkv)])}


# -- main -------------------------------------------------------------------------------------------
def run(a):
    impls = a.impls.split(",")
    formats = a.formats.split(",")
    contexts = [int(s) for s in a.contexts.split(",")]
    n_small, n_big = (int(s) for s in a.layers.split(","))
    vocab = TINY["vocab_size"] if a.tiny else 200064
    bw = measured_bandwidth(GB >> 6 if a.tiny else GB)
    print(f"device={mx.default_device()} mlx={mx.__version__} bandwidth={bw / 1e9:.0f} GB/s", flush=True)
    records = []
    for fmt in formats:
        for impl in impls:
            if impl == "mlx_lm" and fmt != formats[0] and not a.all_formats_mlx_lm:
                continue
            mx.random.seed(0)
            cfg = text_config(n_big, a.tiny)
            try:
                model = build(impl, cfg, fmt)
            except Exception as e:  # a format the backend lacks: say so and go on
                print(f"skip {impl} {fmt}: {type(e).__name__}: {e}", flush=True)
                records.append({"impl": impl, "format": fmt, "skipped": str(e)})
                continue
            all_layers = list(model.layers)
            # --kv-bits quantizes our cache only: mlx-lm's port cannot (its CacheList has no
            # to_quantized), so its unquantized cache is what it runs.
            kv_quant = (a.kv_group_size, a.kv_bits) if a.kv_bits and impl == "ours" else None
            if impl == "ours":
                model.index_bits = a.index_bits
            hidden = cfg["hidden_size"]
            moe = [l for l in all_layers if l.is_moe][0]
            floor = mx.compile(floor_parts(impl, moe, hidden))
            floor_ms = median_ms(lambda: mx.eval(floor()), a.steps)
            fused = fused_floor_parts(impl, moe, hidden)
            fused_ms = median_ms(lambda: mx.eval(mx.compile(fused)()), a.steps) if fused else None
            weights_gb = sum(v.nbytes for _, v in tree_flatten(model.parameters())) / GB
            for S in contexts:
                rec = {"impl": impl, "format": fmt, "context": S, "kv_bits": kv_quant and kv_quant[1],
                       "index_bits": a.index_bits if impl == "ours" else None, "floor_ms": round(floor_ms, 4),
                       "floor_fused_ms": round(fused_ms, 4) if fused_ms else None,
                       "weights_gb": round(weights_gb, 3)}
                capacity = S + a.tokens + a.warm + 8
                ms = {}
                for n in (n_big, n_small):
                    set_layer_count(impl, model, 3 + n, all_layers)
                    mx.reset_peak_memory()
                    caches = (make_caches(impl, model, S, capacity, kv_quant=kv_quant) if impl == "ours"
                              else _lm_caches(model, S, capacity))
                    ms[n], rec[f"generate_{3 + n}"] = time_generate(model, caches, a.tokens, a.warm, a.repeats, S)
                    if n == n_big:
                        rec["bound_ms"] = round(token_bytes(impl, model, S) / bw * 1e3, 4)
                        li = 3  # the first MoE layer
                        x = (mx.random.normal((1, 1, hidden)) * 0.5).astype(mx.bfloat16)
                        mx.eval(x)
                        set_offset(caches, S)
                        rec["layer_ms"] = round(median_ms(layer_step(impl, all_layers[li], caches[li], x, S), a.steps), 4)
                        if a.profile and impl == "ours":
                            rec["profile"] = profile_parts(all_layers[li], caches[li], x, S, a.steps)
                            rec["profile"].update(dense_variants(all_layers[0], caches[0], S, a.steps))
                        cap = a.mlx_lm_prefill_max if impl == "mlx_lm" else 1 << 40
                        if a.chunk and S >= a.chunk and S <= cap:
                            try:
                                rec["prefill_ms"] = round(median_ms(prefill_chunk(impl, model, caches, a.chunk, S, vocab),
                                                                    a.prefill_steps, warm=1), 2)
                            except Exception as e:
                                rec["prefill_error"] = f"{type(e).__name__}: {e}"[:200]
                        rec["peak_gb"] = round(mx.get_peak_memory() / GB, 3)
                    del caches
                    gc.collect()
                    mx.clear_cache()
                slope = (ms[n_big] - ms[n_small]) / (n_big - n_small)
                fixed = ms[n_big] - slope * (3 + n_big)  # dense layers count as layers here
                per60 = fixed + 60 * slope
                rec.update(layers=[3 + n_small, 3 + n_big], ms_per_token=round(ms[n_big], 3),
                           ms_per_token_small=round(ms[n_small], 3), ms_per_layer=round(slope, 4),
                           fixed_ms=round(fixed, 3), ms_per_token_60=round(per60, 2),
                           tok_s_60=round(1e3 / per60, 1) if per60 > 0 else None,
                           added_ms=round(rec["layer_ms"] - floor_ms, 4),
                           slope_over_floor=round(slope / floor_ms, 2))
                records.append(rec)
                print(json.dumps(rec), flush=True)
            if a.kernels:
                records.append(kernel_record(impl, fmt, model, all_layers, hidden, a.tiny))
                print(json.dumps(records[-1]), flush=True)
            del model, all_layers, moe, floor
            gc.collect()
            mx.clear_cache()
    return records, bw


def kernel_record(impl, fmt, model, all_layers, hidden, tiny):
    """Kernels one MoE layer's decode step launches (graph primitives, views excluded)."""
    set_layer_count(impl, model, len(all_layers), all_layers)
    S = 4096 if not tiny else 256
    caches = make_caches(impl, model, S, S + 64) if impl == "ours" else _lm_caches(model, S, S + 64)
    x = (mx.random.normal((1, 1, hidden)) * 0.5).astype(mx.bfloat16)
    mx.eval(x)
    li = 3
    layer = all_layers[li]
    fn = (lambda: layer(x, None, caches[li])) if impl == "mlx_lm" else (lambda: layer(x, caches[li]))
    mx.eval(fn())  # trace compiled parts first, so the count is the steady state
    mx.eval([_arrays(c) for c in caches])
    set_offset(caches, S)
    n, counts = kernel_count(fn)
    return {"impl": impl, "format": fmt, "kernels_per_moe_layer": n, "primitives": counts}


def _lm_caches(model, S, capacity):
    caches = lm_make_cache(model)
    for c in caches:
        for sub in c.caches:
            _fill(sub, S, capacity, mx.bfloat16, model)
    mx.eval([_arrays(c) for c in caches])
    return caches


def table(records):
    rows = [r for r in records if "context" in r]
    print(f"\n{'impl':<7}{'format':<10}{'context':>8}{'ms/tok':>9}{'ms/layer':>9}{'fixed':>7}{'60L ms':>8}"
          f"{'tok/s':>7}{'layer':>8}{'floor':>7}{'added':>7}{'bound':>7}{'prefill':>9}{'peak GB':>8}")
    for r in rows:
        f = lambda k, w, p=3: (f"{r[k]:.{p}f}" if r.get(k) is not None else "-").rjust(w)  # noqa: E731
        print(f"{r['impl']:<7}{r['format']:<10}{r['context']:>8}{f('ms_per_token', 9)}{f('ms_per_layer', 9)}"
              f"{f('fixed_ms', 7, 2)}{f('ms_per_token_60', 8, 1)}{f('tok_s_60', 7, 1)}{f('layer_ms', 8)}"
              f"{f('floor_ms', 7)}{f('added_ms', 7)}{f('bound_ms', 7)}{f('prefill_ms', 9, 1)}{f('peak_gb', 8, 1)}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="reduced widths (CPU smoke run)")
    p.add_argument("--profile", action="store_true", help="split one MoE layer's step into its parts (ours)")
    p.add_argument("--kernels", action="store_true", help="count the kernels of one MoE layer's decode step")
    p.add_argument("--impls", default="ours,mlx_lm")
    p.add_argument("--formats", default="q4", help=f"comma list of {', '.join(FORMATS)}")
    p.add_argument("--all-formats-mlx-lm", action="store_true", help="time mlx-lm in every format, not the first only")
    p.add_argument("--contexts", default=None, help="default: 4K,32K,128K,1M (--tiny: 64,256)")
    p.add_argument("--layers", default=None, help="two MoE layer counts (default 2,6; --tiny 1,2)")
    p.add_argument("--tokens", type=int, default=40, help="timed tokens per generate_step run")
    p.add_argument("--warm", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="generate_step runs per layer count (best median)")
    p.add_argument("--steps", type=int, default=20, help="repetitions of the layer step and floor")
    p.add_argument("--chunk", type=int, default=2048, help="prefill chunk (0: no prefill)")
    p.add_argument("--prefill-steps", type=int, default=2)
    p.add_argument("--mlx-lm-prefill-max", type=int, default=32768,
                   help="skip mlx-lm's prefill above this context (its dense block mask grows with S)")
    p.add_argument("--kv-bits", type=int, choices=(4, 8), default=None, help="quantize our cache (every layer)")
    p.add_argument("--kv-group-size", type=int, default=64)
    p.add_argument("--index-bits", type=int, choices=(4, 8, 16, 32), default=None,
                   help="our index keys (default: 8 with --kv-bits, else bf16)")
    p.add_argument("--sparse-quant", choices=("dequantize", "matmul"), default="matmul",
                   help="attention over gathered quantized blocks (kvquant.SPARSE_ATTENTION)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.kv_bits and a.profile:
        p.error("--profile times the bf16 cache's parts; run it without --kv-bits")
    kvquant.SPARSE_ATTENTION = a.sparse_quant

    if a.tiny:
        a.kv_group_size = min(a.kv_group_size, 32)  # the tiny heads are 32 wide
        a.contexts = a.contexts or "64,256"
        a.layers = a.layers or "1,2"
        a.chunk = min(a.chunk, 32)
    a.contexts = a.contexts or "4096,32768,131072,1048576"
    a.layers = a.layers or "2,6"
    records, bw = run(a)
    meta = {"device": str(mx.default_device()), "mlx": mx.__version__, "bandwidth_gbs": round(bw / 1e9, 1),
            "date": time.strftime("%Y-%m-%d"), "args": vars(a)}
    if a.json:
        Path(a.json).write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    table(records)
    return records


if __name__ == "__main__":
    main()
