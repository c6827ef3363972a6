"""Bad checkpoints are refused with errors that name the file or tensor, never loaded wrong."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from minimax_m3_mlx import CheckpointError, load_model, synthetic


@pytest.fixture()
def ckpt(tmp_path, default_case):
    def write(layout="original", **kw):
        path = tmp_path / layout
        synthetic.write_checkpoint(path, default_case.config, {**default_case.weights, **default_case.vision},
                                   layout, shard_bytes=300_000, **kw)
        return path
    return write


def _rewrite(path, edit):
    """Load every shard's tensors, let `edit` change the dict, write one shard + index."""
    from safetensors.numpy import load_file

    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        try:
            tensors.update(load_file(f))
        except Exception:  # float8 shards: numpy cannot hold e4m3, go through MLX bytes
            tensors.update({k: np.array(v) for k, v in mx.load(str(f)).items()})
        f.unlink()
    edit(tensors)
    tags = {np.dtype(np.float32): "F32", np.dtype(np.uint8): "U8"}
    synthetic.write_safetensors(path / "model.safetensors", {k: (v, tags[v.dtype]) for k, v in tensors.items()})
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: "model.safetensors" for k in tensors}}))


def test_missing_tensor(ckpt):
    path = ckpt()
    _rewrite(path, lambda t: t.pop("language_model.model.layers.2.self_attn.index_k_proj.weight"))
    with pytest.raises(CheckpointError, match="layers.2.self_attn.indexer.k_proj.weight"):
        load_model(path)


def test_missing_expert(ckpt):
    path = ckpt()
    _rewrite(path, lambda t: t.pop("language_model.model.layers.1.block_sparse_moe.experts.5.w3.weight"))
    with pytest.raises(CheckpointError, match=r"layers.1.block_sparse_moe.experts.*w3.*missing experts \[5\]"):
        load_model(path)


def test_extra_tensor(ckpt):
    path = ckpt()
    _rewrite(path, lambda t: t.update({"language_model.model.layers.0.self_attn.surprise.weight": np.zeros(4, np.float32)}))
    with pytest.raises(CheckpointError, match="surprise"):
        load_model(path)


def test_wrong_shape(ckpt):
    path = ckpt()
    _rewrite(path, lambda t: t.update({"language_model.model.norm.weight": np.zeros(63, np.float32)}))
    with pytest.raises(CheckpointError, match=r"language_model.model.norm.weight: shape \(63,\)"):
        load_model(path)


def test_unknown_quantization(ckpt):
    path = ckpt()
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unsupported quantization_config.quant_method 'awq'"):
        load_model(path)


@pytest.mark.parametrize("layout", ["mxfp8", "fp8"])
def test_scale_shape_that_does_not_fit(ckpt, layout):
    path = ckpt(layout)
    name = "language_model.model.layers.1.self_attn.q_proj.weight_scale_inv"
    _rewrite(path, lambda t: t.update({name: t[name][:-1]}))
    with pytest.raises(CheckpointError, match=rf"{name}: .*scale shape"):
        load_model(path)


def test_scale_without_quantization_config(ckpt):
    path = ckpt("mxfp8")
    cfg = json.loads((path / "config.json").read_text())
    del cfg["quantization_config"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="no quantization_config"):
        load_model(path)


def test_truncated_shard(ckpt):
    path = ckpt()
    shard = sorted(path.glob("*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=f"{shard.name}: truncated"):
        load_model(path)


def test_index_names_a_missing_shard(ckpt):
    path = ckpt()
    shard = sorted(path.glob("*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"names shard.*{shard.name}"):
        load_model(path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a local folder"):
        load_model(tmp_path / "nowhere")


def test_mtp_tensors_are_dropped(ckpt):
    path = ckpt()
    _rewrite(path, lambda t: t.update({"mtp.0.proj.weight": np.ones((4, 4), np.float32)}))
    load_model(path)  # loads: the reference ignores multi-token-prediction weights too
