"""MiniMax Sparse Attention: the block-sparse paths equal the masked dense computation.

Long sequences (thousands of tokens) with small blocks, so that selection drops most
blocks; tiles forced small so that the tiled index scoring and the tiled gather run
many tiles; decode (mask-free own-block path) and chunked prefill (general path).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from masked_reference import masked_forward

from minimax_m3_mlx.model import msa
from minimax_m3_mlx.model.attention import Attention
from minimax_m3_mlx.model.cache import SparseKVCache
from minimax_m3_mlx.config import ModelArgs

DIMS = dict(vocab_size=256, dense_intermediate_size=64,
            hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=16, rotary_dim=8,
            index_n_heads=2, index_head_dim=16, index_block_size=8, index_topk_blocks=4,
            num_hidden_layers=1, layer_types=["minimax_m3_sparse"], mlp_layer_types=["dense"])


def layer_for(**overrides):
    args = ModelArgs.from_dict({**DIMS, **overrides})
    layer = Attention(args, 0)
    mx.random.seed(3)
    # random norm weights: a zero norm weight would hide a missing (1 + w)
    layer.update(dict(q_norm={"weight": mx.random.normal((args.head_dim,)) * 0.3},
                      k_norm={"weight": mx.random.normal((args.head_dim,)) * 0.3}))
    layer.indexer.update(dict(q_norm={"weight": mx.random.normal((args.index_head_dim,)) * 0.3},
                              k_norm={"weight": mx.random.normal((args.index_head_dim,)) * 0.3}))
    return layer, args


def run(layer, args, x, chunks, impl):
    forward = masked_forward if impl == "masked" else (lambda m, xs, cache: m(xs, cache=cache))
    cache = SparseKVCache(args.index_block_size, layer.index_dtype)
    outs, start = [], 0
    for n in chunks:
        outs.append(forward(layer, x[:, start:start + n], cache))
        start += n
    return np.array(mx.concatenate(outs, axis=1))


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


CASES = {
    "default": {},
    "two_local": {"index_local_blocks": 2},
    "no_local": {"index_local_blocks": 0},
    "index_heads_4_kv_2": {"index_n_heads": 4},
    "index_heads_1_kv_2": {"index_n_heads": 1},
    "block_5_ragged": {"index_block_size": 5, "index_topk_blocks": 6},
}


@pytest.mark.parametrize("name", list(CASES))
def test_sparse_equals_masked_dense(name, monkeypatch):
    # small tiles: ~30 index tiles and a gather tile of a few queries per chunk
    monkeypatch.setattr(msa, "INDEX_TILE_ELEMENTS", 2 * 8 * 64 * 6)
    monkeypatch.setattr(msa, "GATHER_TILE_BYTES", 8 * 4 * 8 * 32 * 4 * 3)
    layer, args = layer_for(**CASES[name])
    S = 2100
    x = mx.random.normal((2, S, args.hidden_size), key=mx.random.key(7))
    chunks = [900, 1, 899, 260] + [1] * 40  # prefill chunks of odd sizes, then decode
    sparse = run(layer, args, x, chunks, "gather")
    masked = run(layer, args, x, chunks, "masked")
    assert rel(sparse, masked) < 1e-5
    # and selection matters here: keeping every block gives another answer
    layer.topk = 10 ** 6
    dense = run(layer, args, x, [S], "gather")
    assert rel(dense[:, -300:], masked[:, -300:]) > 1e-3


def test_index_scores_tiled_equal_untiled(monkeypatch):
    rng = mx.random.key(0)
    q = mx.random.normal((2, 3, 40, 16), key=rng)
    keys = mx.random.normal((2, 1, 1200, 16), key=mx.random.key(1))
    full = msa.index_block_scores(q, keys, 1000, 8)
    monkeypatch.setattr(msa, "INDEX_TILE_ELEMENTS", 2 * 3 * 40 * 8 * 3)
    tiled = msa.index_block_scores(q, keys, 1000, 8)
    np.testing.assert_array_equal(np.array(full), np.array(tiled))
    # brute force: causal float32 scores, max per block of 8
    s = np.einsum("bhld,bksd->bhls", np.array(q, np.float32), np.array(keys[:, :, :1040], np.float32))
    pos = np.arange(1000, 1040)[:, None]
    s = np.where(np.arange(1040)[None] <= pos, s, -np.inf).reshape(2, 3, 40, 130, 8).max(-1)
    np.testing.assert_allclose(np.array(full), s, rtol=1e-5, atol=1e-5)


def test_selection_matches_reference_rule():
    """Top-k per head, local blocks forced in, future blocks invalid: against a numpy rule."""
    rng = np.random.default_rng(0)
    B, H, L, nb, bs, k, local, offset = 1, 2, 6, 12, 4, 3, 2, 40
    scores = rng.normal(size=(B, H, L, nb)).astype(np.float32)
    qpos = np.arange(offset, offset + L)
    scores[..., :] = np.where(np.arange(nb)[None] * bs > qpos[:, None], -np.inf, scores)
    idx, valid = msa.select_blocks(mx.array(scores), offset, bs, k, local)
    idx, valid = np.array(idx), np.array(valid)
    for h in range(H):
        for i in range(L):
            s = scores[0, h, i].copy()
            qb = qpos[i] // bs
            s[max(0, qb - local + 1):qb + 1] = np.inf
            top = np.argsort(-s, kind="stable")[:k]
            want = {int(b) for b in top if s[b] > -np.inf}  # a kept -inf block is no block
            got = {int(b) for b in idx[0, h, i][valid[0, h, i]]}
            assert got == want


def test_gather_blocks_views_whole_buffer():
    buf = mx.random.normal((2, 3, 32, 4)).astype(mx.bfloat16)
    ids = mx.array([[0, 7], [9, 23]])  # flattened (b, h, block) ids, 8 blocks of 4 per row
    got = np.array(msa.gather_blocks(buf, ids, 4).astype(mx.float32))
    rows = np.array(buf.astype(mx.float32)).reshape(2 * 3 * 8, 4, 4)
    np.testing.assert_array_equal(got, rows[np.array(ids)])
