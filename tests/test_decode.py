"""The compiled single-token layer step (decode.py) equals the op-by-op path it replaces."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_map

from minimax_m3_mlx import synthetic
from minimax_m3_mlx.config import ModelArgs
from minimax_m3_mlx.model import Model, decode

PROMPT, TOTAL = 37, 64  # blocks of 4, top-3: selection drops blocks from the first decoded token on


def tiny_model(overrides=None, quantize=False, seed=0):
    model = Model(ModelArgs.from_dict(synthetic.tiny_config(overrides)))
    mx.random.seed(seed)
    # random everything: a zero norm weight or router bias would hide a dropped term
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.3, model.parameters()))
    if quantize:
        nn.quantize(model, 32, 4, class_predicate=model.quant_predicate)
    mx.eval(model.parameters())
    return model


def generate_logits(model, tokens, fast, monkeypatch):
    steps = []
    real_step = decode.step

    def counting_step(layer, x, cache):
        steps.append(layer)
        return real_step(layer, x, cache)

    monkeypatch.setattr(decode, "step", counting_step)
    if not fast:
        monkeypatch.setattr(decode, "usable", lambda *a: False)
    cache = model.make_cache()
    outs = [model(tokens[:, :PROMPT], cache=cache)[:, -1:]]
    for t in range(PROMPT, TOTAL):
        outs.append(model(tokens[:, t:t + 1], cache=cache))
    monkeypatch.undo()
    return np.array(mx.concatenate(outs, axis=1)), len(steps)


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


CASES = {
    "default": ({}, False),  # layer 0 dense full attention, layers 1-3 MoE with sparse attention
    "quantized": ({}, True),
    "two_local_blocks": ({"sparse_attention_config": {"sparse_local_block": 2}}, False),
    "no_local_block": ({"sparse_attention_config": {"sparse_local_block": 0}}, False),  # op by op
    "index_heads_4_kv_2": ({"sparse_attention_config": {"sparse_num_index_heads": 4}}, False),  # op by op
}


@pytest.mark.parametrize("name", list(CASES))
def test_compiled_step_equals_op_by_op(name, monkeypatch):
    overrides, quantize = CASES[name]
    model = tiny_model(overrides, quantize)
    tokens = mx.array(np.random.default_rng(1).integers(0, 256, (2, TOTAL)))
    slow, n_slow = generate_logits(model, tokens, False, monkeypatch)
    fast, n_fast = generate_logits(model, tokens, True, monkeypatch)
    assert n_slow == 0
    n_layers = len(model.layers)
    if name in ("no_local_block", "index_heads_4_kv_2"):  # only the dense layer 0 is compiled
        assert n_fast == TOTAL - PROMPT
    else:
        assert n_fast == (TOTAL - PROMPT) * n_layers
    assert rel(fast, slow) < 1e-5


def test_new_weights_are_used_after_the_first_token(monkeypatch):
    model = tiny_model()
    tokens = mx.array(np.random.default_rng(2).integers(0, 256, (1, TOTAL)))
    generate_logits(model, tokens, True, monkeypatch)  # traces every layer's graphs
    other = tiny_model(seed=5)
    model.update(other.parameters())
    fast, _ = generate_logits(model, tokens, True, monkeypatch)
    slow, _ = generate_logits(other, tokens, False, monkeypatch)
    assert rel(fast, slow) < 1e-5
