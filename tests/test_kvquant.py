"""Quantized caches on every layer (--kv-bits): types, errors against mlx-lm's dense baseline,
save/load/trim, mlx-lm's generate_step switches, and bytes per token at the real widths."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step, maybe_quantize_kv_cache
from mlx_lm.models.cache import QuantizedKVCache, load_prompt_cache, save_prompt_cache, trim_prompt_cache

from minimax_m3_mlx import SparseKVCache, load_model, synthetic
from minimax_m3_mlx.config import ModelArgs
from minimax_m3_mlx.convert.recipes import REAL_CONFIG
from minimax_m3_mlx.model.kvquant import QuantizedSparseKVCache
from minimax_m3_mlx.parallel.sizing import cache_bytes

GS = 32  # the tiny heads are 32 wide
PROMPT = 300  # 75 blocks of 4, 3 kept: selection active
TOKENS = np.random.default_rng(3).integers(0, 256, (1, PROMPT + 16))


@pytest.fixture(scope="module")
def model(tmp_path_factory, default_case):
    path = tmp_path_factory.mktemp("kvquant_model")
    synthetic.write_checkpoint(path, default_case.config, default_case.weights, "original")
    return load_model(path)[0]


def _dense(model, dense: bool):
    """The same weights with every layer dense (or back): mlx-lm's QuantizedKVCache baseline."""
    for layer in model.layers:
        attn = layer.self_attn
        attn.__dict__.setdefault("_was_sparse", attn.is_sparse)
        attn.is_sparse = attn._was_sparse and not dense
        layer.__dict__.pop("_decode_fns", None)  # compiled for the other branch


def _decode_logits(model, bits):
    cache = model.make_cache()
    model(mx.array(TOKENS[:, :PROMPT]), cache=cache)
    if bits:
        maybe_quantize_kv_cache(cache, 0, GS, bits)
    out = [model(mx.array(TOKENS[:, i:i + 1]), cache=cache)[0, -1] for i in range(PROMPT, TOKENS.shape[1])]
    return np.array(mx.stack(out)).astype(np.float64), cache


def _rel_rms(a, b):
    return float(np.sqrt(((a - b) ** 2).mean() / (b ** 2).mean()))


@pytest.mark.parametrize("bits", [8, 4])
def test_every_layer_quantized_and_error_vs_dense_baseline(model, bits):
    try:
        _dense(model, True)
        ref_d, _ = _decode_logits(model, None)
        q_d, cache_d = _decode_logits(model, bits)
    finally:
        _dense(model, False)
    assert all(type(c) is QuantizedKVCache for c in cache_d)
    ref, _ = _decode_logits(model, None)
    q, cache = _decode_logits(model, bits)
    sparse = [c for c, l in zip(cache, model.layers) if l.self_attn.is_sparse]
    assert sparse and all(type(c) is QuantizedSparseKVCache for c in sparse)
    assert all(type(c) is QuantizedKVCache for c, l in zip(cache, model.layers) if not l.self_attn.is_sparse)
    for c in sparse:  # nothing full precision: K, V and the index keys are packed words
        assert c.bits == bits and c.index_bits == 8
        assert all(p[0].dtype == mx.uint32 for p in (c.keys, c.values, c.index_keys))
    err, base = _rel_rms(q, ref), _rel_rms(q_d, ref_d)
    top1 = float((q.argmax(-1) == ref.argmax(-1)).mean())
    print(f"\n{bits}-bit: sparse rel. RMS {err:.4f}, dense baseline {base:.4f}, top-1 agreement {top1:.2f}")
    # Measured (BENCHMARKS.md): the sparse model's error is 10-30x the dense baseline's on
    # this tiny random model, from selection flips; held here to what is measured, not to the
    # issue's 3x target (open).
    assert err < 40 * base and err < (0.1 if bits == 8 else 0.5)


def test_exact_index_keys_isolate_the_selection_flips(model):
    """Where the whole-model gap comes from: 8-bit K/V with the index keys exact
    (--index-bits 16) errs within 3x of mlx-lm's dense baseline; 8-bit index keys add the
    selection flips (BENCHMARKS.md has the figures)."""
    try:
        _dense(model, True)
        ref_d, _ = _decode_logits(model, None)
        base = _rel_rms(_decode_logits(model, 8)[0], ref_d)
    finally:
        _dense(model, False)
    ref, _ = _decode_logits(model, None)
    errs = {}
    for index_bits in (16, 8):
        model.index_bits = index_bits
        try:
            errs[index_bits] = _rel_rms(_decode_logits(model, 8)[0], ref)
        finally:
            model.index_bits = None
    print(f"\n8-bit K/V: exact index keys {errs[16]:.4f}, 8-bit index keys {errs[8]:.4f}, dense baseline {base:.4f}")
    assert errs[16] < 3 * base < errs[8]


def test_quantized_decode_step_equals_chunk_path(model):
    """The compiled quantized decode step (gathered triples) computes what the chunk path
    (msa.sparse_attention over QuantizedRows) computes for the same token."""
    caches = []
    for _ in range(2):
        c = model.make_cache()
        model(mx.array(TOKENS[:, :PROMPT]), cache=c)
        maybe_quantize_kv_cache(c, 0, GS, 8)
        caches.append(c)
    chunk = np.array(model(mx.array(TOKENS[:, PROMPT:PROMPT + 2]), cache=caches[0]))[0, -1]
    model(mx.array(TOKENS[:, PROMPT:PROMPT + 1]), cache=caches[1])
    step = np.array(model(mx.array(TOKENS[:, PROMPT + 1:PROMPT + 2]), cache=caches[1]))[0, -1]
    np.testing.assert_allclose(step, chunk, rtol=1e-4, atol=1e-4)


def test_generate_step_kv_bits_and_save_load_trim(model, tmp_path):
    cache = model.make_cache()
    for _ in zip(generate_step(mx.array(TOKENS[0, :40]), model, max_tokens=3, prompt_cache=cache,
                               kv_bits=4, kv_group_size=GS, quantized_kv_start=0), range(3)):
        pass
    assert all(type(c) in (QuantizedKVCache, QuantizedSparseKVCache) for c in cache)
    save_prompt_cache(str(tmp_path / "q.safetensors"), cache)
    loaded = load_prompt_cache(str(tmp_path / "q.safetensors"))
    assert [type(c) for c in loaded] == [type(c) for c in cache]
    nxt = mx.array(TOKENS[:, 50:53])
    np.testing.assert_allclose(np.array(model(nxt, cache=cache)), np.array(model(nxt, cache=loaded)), atol=1e-5)
    assert trim_prompt_cache(loaded, 3) == 3 and all(c.offset == cache[0].offset - 3 for c in loaded)


def test_cannot_quantize_is_an_error(model):
    cache = model.make_cache()
    model(mx.array(TOKENS[:, :20]), cache=cache)
    sparse = next(c for c in cache if isinstance(c, SparseKVCache))
    with pytest.raises(ValueError, match="--kv-bits 3"):
        sparse.to_quantized(GS, 3)
    with pytest.raises(ValueError, match="does not divide"):
        sparse.to_quantized(64, 4)  # 32-wide heads


def test_bytes_per_token_real_widths():
    """--kv-bits 4 with 8-bit index keys, group 64: <= 42 KiB per token, plan and measured."""
    import json

    args = ModelArgs.from_dict(json.loads(open(REAL_CONFIG).read()))
    n = 2048
    kv, idx = cache_bytes(args, n, kv_bits=4, index_bits=8, group_size=64)
    assert (kv + idx) / n <= 42 * 1024
    # measured: one real-width sparse layer's cache, quantized, nbytes per token
    c = SparseKVCache(args.index_block_size)
    k = mx.zeros((1, args.num_key_value_heads, n, args.head_dim), mx.bfloat16)
    c.update_index(mx.zeros((1, 1, n, args.index_head_dim), mx.bfloat16))
    c.update_and_fetch(k, k)
    q = c.to_quantized(64, 4)
    per_layer_kv, per_layer_idx = cache_bytes(args, n, layers=(3, 4), kv_bits=4, index_bits=8, group_size=64)
    assert q.nbytes == per_layer_kv + per_layer_idx
    assert (per_layer_kv / n, per_layer_idx / n) == (576, 136)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("bits", [8, 4])
def test_layer_error_within_3x_of_dense_layer(model, dtype, bits):
    """Same inputs, one layer: the sparse layer over its quantized cache (gathered triples,
    8-bit index keys) errs within 3x of a full-attention layer over mlx-lm's QuantizedKVCache."""
    from mlx_lm.models.cache import KVCache

    x = mx.random.normal((1, PROMPT, model.args.hidden_size), key=mx.random.key(1)).astype(dtype)
    x1 = mx.random.normal((1, 1, model.args.hidden_size), key=mx.random.key(2)).astype(dtype)
    errs = {}
    for li in (0, 1):
        attn = model.layers[li].self_attn
        attn.set_dtype(dtype)
        try:
            make = (lambda: SparseKVCache(attn.block_size)) if attn.is_sparse else KVCache
            c = make()
            attn(x, c)
            ref = np.array(attn(x1, c).astype(mx.float32))
            c = make()
            attn(x, c)
            c = c.to_quantized(GS, bits)
            assert type(c) is (QuantizedSparseKVCache if attn.is_sparse else QuantizedKVCache)
            errs[li] = _rel_rms(np.array(attn(x1, c).astype(mx.float32)), ref)
        finally:
            attn.set_dtype(mx.float32)
    print(f"\n{dtype} {bits}-bit: sparse layer {errs[1]:.4f}, dense layer {errs[0]:.4f}")
    assert errs[1] < 3 * errs[0]


def test_matmul_variant_equals_dequantize(model, monkeypatch):
    """The benchmark's other attention over gathered quantized blocks computes the same."""
    from minimax_m3_mlx.model import kvquant

    outs = []
    for variant in ("dequantize", "matmul"):
        monkeypatch.setattr(kvquant, "SPARSE_ATTENTION", variant)
        cache = model.make_cache()
        model(mx.array(TOKENS[:, :PROMPT]), cache=cache)
        maybe_quantize_kv_cache(cache, 0, GS, 4)
        outs.append(np.array(model(mx.array(TOKENS[:, PROMPT:PROMPT + 1]), cache=cache)))
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-4, atol=1e-4)


def test_decode_attends_over_whole_buffers(monkeypatch):
    """A quantized decode query attends over the cache's whole (contiguous) buffers with the
    slots past the keys masked, which MLX CUDA's quantized matmul needs; the same result.
    Both ways mlx-lm makes a QuantizedKVCache: filled directly (tuples) and by
    KVCache.to_quantized (lists)."""
    from mlx_lm.models.base import quantized_scaled_dot_product_attention
    from mlx_lm.models.cache import KVCache

    from minimax_m3_mlx.model import kvquant

    r = np.random.default_rng(0)
    k, v, k1, v1 = (mx.array(r.standard_normal((1, 2, n, 32)).astype(np.float32)) for n in (300, 300, 1, 1))
    q = mx.array(r.standard_normal((1, 4, 1, 32)).astype(np.float32))
    direct = QuantizedKVCache(group_size=GS, bits=4)
    direct.update_and_fetch(k, v)
    plain = KVCache()
    plain.update_and_fetch(k, v)
    converted = plain.to_quantized(group_size=GS, bits=4)
    seen = []

    def recording(q, k, v, **kw):
        seen.append((k[0].shape[2], kw["mask"]))
        return quantized_scaled_dot_product_attention(q, k, v, **kw)

    monkeypatch.setattr(kvquant, "quantized_scaled_dot_product_attention", recording)
    for cache in (direct, converted):
        keys, values = cache.update_and_fetch(k1, v1)
        seen.clear()
        # (mlx-lm's quantized attention scales its queries in place: each call gets its own)
        got = kvquant.dense_attention(mx.array(q), keys, values, 0.2, cache)
        want = quantized_scaled_dot_product_attention(mx.array(q), keys, values, scale=0.2, mask=None,
                                                      group_size=GS, bits=4)
        assert seen[0][0] == cache.keys[0].shape[2] > 301 and int(seen[0][1].sum()) == 301
        np.testing.assert_allclose(np.array(got), np.array(want.transpose(0, 2, 1, 3)), rtol=1e-5, atol=1e-6)
