"""Every numeric path against transformers' MiniMaxM3SparseForConditionalGeneration (float32).

For each checkpoint layout and each config case: full-sequence logits, prefill in uneven
chunks through the cache, then token-by-token decode, with batch 2, on sequences much
longer than block_size x topk so that block selection drops blocks.
"""

from __future__ import annotations

import zlib

import mlx.core as mx
import numpy as np
import pytest
from conftest import Case
from reference import reference_logits, rel_err

from minimax_m3_mlx import load_model, synthetic

TOL = 1e-4
CHUNKS = [(0, 13), (13, 14), (14, 45)]  # uneven, one of a single token; then decode 45..SEQ


def ours_full_and_incremental(model, tokens):
    full = np.array(model(mx.array(tokens)))
    cache = model.make_cache()
    parts = [np.array(model(mx.array(tokens[:, a:b]), cache=cache)) for a, b in CHUNKS]
    for i in range(CHUNKS[-1][1], tokens.shape[1]):  # 25 decode steps
        parts.append(np.array(model(mx.array(tokens[:, i:i + 1]), cache=cache)))
    return full, np.concatenate(parts, axis=1)


def check(model, reference, tokens):
    ref = reference_logits(reference, tokens)
    full, incremental = ours_full_and_incremental(model, tokens)
    assert full.shape == ref.shape == incremental.shape
    e_full, e_inc = rel_err(full, ref), rel_err(incremental, ref)
    assert e_full < TOL, f"full forward rel err {e_full:.2e}"
    assert e_inc < TOL, f"chunked prefill + decode rel err {e_inc:.2e}"
    return e_full, e_inc


@pytest.mark.parametrize("layout", synthetic.LAYOUTS)
def test_layout_parity(layout, default_case, tokens, tmp_path):
    # fp8: 24x40 blocks leave ragged edge blocks on every tiny matrix (64, 96, 256 wide)
    reference = default_case.write(tmp_path, layout, fp8_block=(24, 40))
    model, _ = load_model(tmp_path)
    check(model, reference, tokens)


CASES = {
    # top-k (64) >= number of blocks everywhere: the sparse layers keep every block
    "topk_ge_blocks": {"sparse_attention_config": {"sparse_topk_blocks": 64}},
    "two_local_blocks": {"sparse_attention_config": {"sparse_local_block": 2}},
    "no_local_block": {"sparse_attention_config": {"sparse_local_block": 0}},
    "all_sparse": {"moe_layer_freq": [1, 1, 1, 1], "sparse_attention_config": {"sparse_attention_freq": [1, 1, 1, 1]}},
    "all_dense": {"moe_layer_freq": [0, 0, 0, 0], "sparse_attention_config": {"sparse_attention_freq": [0, 0, 0, 0]}},
    # block of 5: 70 tokens end in a ragged tail block of... 0, so use 7 (70 = 10 x 7 is whole; 69 used below)
    "block7_ragged": {"sparse_attention_config": {"sparse_block_size": 7, "sparse_topk_blocks": 2}},
    # more index heads than KV heads, and fewer: selection groups are the finer partition
    "index_heads_4_kv_2": {"sparse_attention_config": {"sparse_num_index_heads": 4}},
    "index_heads_2_kv_4": {"num_key_value_heads": 4},
}


@pytest.mark.parametrize("name", list(CASES))
def test_config_case_parity(name, tokens, tmp_path):
    case = Case(CASES[name], seed=zlib.crc32(name.encode()) % 1000)  # stable across runs
    reference = case.write(tmp_path, "original")
    model, _ = load_model(tmp_path)
    toks = tokens[:, :69] if name == "block7_ragged" else tokens  # 69 = 9 x 7 + 6: ragged tail
    check(model, reference, toks)


def test_selection_is_active(default_case, tokens):
    """The default case's sparse layers really drop blocks: keeping all of them changes the logits."""
    from reference import build_reference

    dense_cfg = synthetic.tiny_config({"sparse_attention_config": {"sparse_topk_blocks": 1000}})
    dense_ref, _ = build_reference(dense_cfg, default_case.weights)
    sparse = reference_logits(default_case.reference, tokens)
    assert rel_err(reference_logits(dense_ref, tokens), sparse) > 1e-2


def test_short_prompt_keeps_every_block(default_case, tmp_path):
    """Fewer blocks than top-k (10 tokens, 3 blocks of 4): dense path, still the reference."""
    reference = default_case.write(tmp_path, "original")
    model, _ = load_model(tmp_path)
    toks = np.arange(10)[None] + 40
    ref = reference_logits(reference, toks)
    assert rel_err(np.array(model(mx.array(toks))), ref) < TOL


def test_mlx_lm_load_model_every_layout(default_case, tokens, tmp_path):
    """mlx-lm's own loader with our classes loads each layout to the same model.

    mlx-lm 0.32.2's port fails on fp8 + ue8m0 and on 128x128 FP8; ours must not.
    """
    from mlx_lm.utils import load_model as lm_load_model

    from minimax_m3_mlx import get_model_classes

    for layout in synthetic.LAYOUTS:
        path = tmp_path / layout
        reference = default_case.write(path, layout, fp8_block=(24, 40))
        model, _ = lm_load_model(path, get_model_classes=get_model_classes)
        ref = reference_logits(reference, tokens[:1])
        assert rel_err(np.array(model(mx.array(tokens[:1]))), ref) < TOL, layout


def test_mxfp8_stays_packed(default_case, tmp_path):
    """The MXFP8 release loads as mxfp8 quantised layers (no dequantised copy)."""
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    default_case.write(tmp_path, "mxfp8")
    model, _ = load_model(tmp_path)
    layer = model.layers[1]
    for m in (layer.self_attn.q_proj, layer.mlp.shared_experts.up_proj):
        assert isinstance(m, nn.QuantizedLinear) and m.mode == "mxfp8" and m.bits == 8 and m.group_size == 32
    assert isinstance(layer.mlp.switch_mlp.gate_proj, QuantizedSwitchLinear)
    # left in high precision, as the release leaves them
    assert isinstance(layer.self_attn.indexer.q_proj, nn.Linear) and not isinstance(
        layer.self_attn.indexer.q_proj, nn.QuantizedLinear)
    assert isinstance(model.language_model.lm_head, nn.Linear)


def test_mxfp8_bytes_are_ocp(default_case, tmp_path):
    """The synthetic MXFP8 tensors decode, by torch's float8_e4m3fn and 2^(e-127), to the
    reference weights: the layout is OCP MXFP8 independently of MLX's own decoder."""
    import torch

    w = default_case.weights["model.language_model.layers.1.self_attn.q_proj.weight"]
    q, e, deq = synthetic.quantize_mxfp8(w)
    decoded = torch.from_numpy(q).view(torch.float8_e4m3fn).float().numpy()
    decoded = decoded.reshape(*w.shape[:-1], -1, 32) * np.exp2(e.astype(np.float64) - 127)[..., None]
    np.testing.assert_array_equal(decoded.reshape(w.shape).astype(np.float32), deq)
    assert rel_err(deq, w) < 0.05


def test_batch_rows_are_independent(default_case, tokens, tmp_path):
    """A row's logits do not depend on the other rows of its batch (selection is per row)."""
    default_case.write(tmp_path, "original")
    model, _ = load_model(tmp_path)
    both = np.array(model(mx.array(tokens)))
    one = np.array(model(mx.array(tokens[1:])))
    assert rel_err(both[1:], one) < 1e-5
