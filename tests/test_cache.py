"""Caches under mlx-lm's generation tools: save/load, trim, generate_step; and the context limit."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache, trim_prompt_cache

from minimax_m3_mlx import SparseKVCache, load_model, synthetic


@pytest.fixture(scope="module")
def model(tmp_path_factory, default_case):
    path = tmp_path_factory.mktemp("cache_model")
    synthetic.write_checkpoint(path, default_case.config, default_case.weights, "original")
    return load_model(path)[0]


TOKENS = np.random.default_rng(5).integers(0, 256, (1, 60))


def test_save_load_continue(model, tmp_path):
    cache = model.make_cache()
    model(mx.array(TOKENS[:, :40]), cache=cache)
    save_prompt_cache(str(tmp_path / "c.safetensors"), cache)
    loaded = load_prompt_cache(str(tmp_path / "c.safetensors"))
    assert any(isinstance(c, SparseKVCache) for c in loaded)
    assert all(a.offset == b.offset == 40 for a, b in zip(cache, loaded))
    for a, b in zip(cache, loaded):  # the index keys keep their storage dtype
        if isinstance(a, SparseKVCache):
            assert b.index_dtype == a.index_dtype and b.index_keys.dtype == a.index_keys.dtype
    a = np.array(model(mx.array(TOKENS[:, 40:]), cache=cache))
    b = np.array(model(mx.array(TOKENS[:, 40:]), cache=loaded))
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_trim_then_refeed_equals_uninterrupted(model):
    cache = model.make_cache()
    model(mx.array(TOKENS[:, :50]), cache=cache)
    assert trim_prompt_cache(cache, 10) == 10
    again = np.array(model(mx.array(TOKENS[:, 40:]), cache=cache))
    full = np.array(model(mx.array(TOKENS)))[:, 40:]
    np.testing.assert_allclose(again, full, rtol=2e-5, atol=2e-5)


def test_generate_step_equals_argmax_of_full_forward(model):
    toks = [t for (t, _), _ in zip(generate_step(mx.array(TOKENS[0, :30]), model, max_tokens=12,
                                                 prefill_step_size=7), range(12))]
    seq = [int(t) for t in TOKENS[0, :30]]
    for t in toks:  # greedy: each token is the argmax of the full forward over the sequence so far
        assert t == int(np.array(model(mx.array([seq])))[0, -1].argmax())
        seq.append(t)


def test_context_limit(model):
    limit = model.args.max_position_embeddings
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        model(mx.zeros((1, limit + 1), dtype=mx.int32))
    cache = model.make_cache()
    model(mx.array(TOKENS[:, :10]), cache=cache)
    for c in cache:
        c.offset = limit  # as if the context were full
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        model(mx.array(TOKENS[:, :1]), cache=cache)
