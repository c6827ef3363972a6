"""ModelArgs: both config spellings, the real config, and self-contradicting configs refused."""

from __future__ import annotations

import copy
import re
import json
from pathlib import Path

import pytest

from minimax_m3_mlx import ConfigError, ModelArgs, synthetic

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_published_and_resave_spellings_agree():
    published = ModelArgs.from_dict(synthetic.tiny_config())
    resave = ModelArgs.from_dict(synthetic.resave_config(synthetic.tiny_config()))
    for field in ("layer_types", "mlp_layer_types", "index_n_heads", "index_head_dim", "index_block_size",
                  "index_topk_blocks", "index_local_blocks", "rotary_dim", "rope_theta", "head_dim"):
        assert getattr(published, field) == getattr(resave, field), field
    assert published.mlp_layer_types == ["dense", "sparse", "sparse", "sparse"]
    assert published.layer_types[0] == "full_attention" and published.layer_types[1] == "minimax_m3_sparse"


def test_real_config():
    args = ModelArgs.from_file(CONFIGS / "minimax_m3.json")
    assert (args.hidden_size, args.num_hidden_layers, args.num_attention_heads, args.num_key_value_heads) == (
        6144, 60, 64, 4)
    assert args.rotary_dim == 64 and args.rope_theta == 5e6 and args.num_local_experts == 128
    assert args.mlp_layer_types[:4] == ["dense", "dense", "dense", "sparse"]
    assert sum(args.is_sparse_attention(i) for i in range(60)) == 57
    assert (args.index_n_heads, args.index_head_dim, args.index_block_size, args.index_topk_blocks,
            args.index_local_blocks) == (4, 128, 128, 16, 1)


def _bad(mutate):
    cfg = copy.deepcopy(synthetic.tiny_config())
    mutate(cfg["text_config"])
    return cfg


@pytest.mark.parametrize("mutate, key", [
    (lambda t: t.update(moe_layer_freq=[0, 1]), "moe_layer_freq"),
    (lambda t: t["sparse_attention_config"].update(sparse_attention_freq=[1] * 7), "sparse_attention_freq"),
    (lambda t: t.update(mlp_layer_types=["dense", "sparse", "banana", "sparse"]), "mlp_layer_types"),
    (lambda t: t["sparse_attention_config"].update(sparse_num_index_heads=3), "index_n_heads"),
    (lambda t: t["sparse_attention_config"].update(sparse_block_size=0), "index_block_size"),
    (lambda t: t["sparse_attention_config"].update(sparse_local_block=5), "index_local_blocks"),
    (lambda t: t.update(num_key_value_heads=3), "num_key_value_heads"),
    (lambda t: t.update(rotary_dim=8), "rotary_dim"),  # contradicts partial_rotary_factor 0.5 x 32
    (lambda t: t.update(index_block_size=8), "index_block_size"),  # contradicts the nested key
])
def test_contradictions_are_named(mutate, key):
    with pytest.raises(ConfigError, match=key):
        ModelArgs.from_dict(_bad(mutate))


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        ModelArgs.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelArgs.from_file(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match="JSON object"):
        ModelArgs.from_file(tmp_path)


@pytest.mark.parametrize("config, key", [
    ({}, "vocab_size: required"),
    ({"text_config": {}}, "vocab_size: required"),
    (_bad(lambda t: t.pop("hidden_size")), "hidden_size: required"),
    (_bad(lambda t: t.pop("num_local_experts")), "num_local_experts: required"),
    (_bad(lambda t: t.pop("dense_intermediate_size")), "dense_intermediate_size: required"),
    (_bad(lambda t: t["sparse_attention_config"].pop("sparse_num_index_heads")),
     "index_n_heads (or sparse_attention_config.sparse_num_index_heads): required"),
    (_bad(lambda t: t.update(num_hidden_layers="four")), "text_config.num_hidden_layers: must be an integer"),
    (_bad(lambda t: t.update(hidden_size=64.0)), "text_config.hidden_size: must be an integer"),
    (_bad(lambda t: t.update(rms_norm_eps="small")), "text_config.rms_norm_eps: must be a number"),
    (_bad(lambda t: t.update(tie_word_embeddings="no")), "tie_word_embeddings: must be true or false"),
    (_bad(lambda t: t["sparse_attention_config"].update(sparse_block_size="4")),
     "sparse_attention_config.sparse_block_size: must be an integer"),
    (_bad(lambda t: t.update(sparse_attention_config=[1])), "sparse_attention_config: must be an object"),
    ({**synthetic.tiny_config(), "text_config": "tiny"}, "text_config: must be an object"),
])
def test_missing_and_mistyped_keys_are_named(config, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        ModelArgs.from_dict(config)


def test_flat_config_needs_the_same_keys():
    flat = {**synthetic.tiny_config()["text_config"]}
    ModelArgs.from_dict(flat)  # mlx-lm style: text keys at the top level
    flat.pop("vocab_size")
    with pytest.raises(ConfigError, match="vocab_size: required"):
        ModelArgs.from_dict(flat)
