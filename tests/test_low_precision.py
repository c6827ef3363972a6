"""bf16 / fp16 weights generate on this backend (MLX's CPU gather_mm takes float32 only).

The checkpoints hold real bf16 / fp16 tensors: written in those dtypes (the original
layout, as the BF16 release), converted with `--dtype bfloat16`, and quantised from a
bf16 source (small layers stay unquantised there).
"""

from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx

from minimax_m3_mlx import cli, synthetic
from minimax_m3_mlx import load_model


@pytest.fixture(scope="module")
def rounded():
    config = synthetic.tiny_config()
    weights = synthetic.random_weights(config, seed=5)
    return config, {k: synthetic.round_to_dtype(v, "bfloat16") for k, v in weights.items()}


@pytest.fixture(scope="module")
def bf16_source(rounded, tmp_path_factory):
    path = tmp_path_factory.mktemp("bf16")
    synthetic.write_checkpoint(path, *rounded, "original", dtype="bfloat16")
    return path


def test_expert_matmul_of_half_weights_is_the_float32_one():
    from mlx_lm.models.switch_layers import SwitchLinear

    from minimax_m3_mlx.model.moe import ExpertLinear

    ref = SwitchLinear(16, 8, 4, bias=False)
    half = ExpertLinear(16, 8, 4, bias=False)
    half.weight = ref.weight.astype(mx.bfloat16)
    ref.weight = half.weight.astype(mx.float32)
    x = mx.random.normal((5, 1, 1, 16)).astype(mx.bfloat16)
    idx = mx.array([[0, 3], [1, 1], [2, 0], [3, 2], [0, 1]])
    got = half(mx.expand_dims(x, -3), idx)
    assert got.dtype == mx.bfloat16
    want = ref(mx.expand_dims(x.astype(mx.float32), -3), idx)
    np.testing.assert_array_equal(np.array(got.astype(mx.float32)),
                                  np.array(want.astype(mx.bfloat16).astype(mx.float32)))


def _logits(path, ids):
    model = load_model(path)[0]
    return model, np.array(model(mx.array(ids)[None]).astype(mx.float32))


def _generate(path, capsys):
    rc = cli.main(["generate", "--model", str(path), "-p", "hi", "-m", "4", "--thinking", "disabled"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "Generation: 4 tokens" in out.out


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoint_generates_close_to_float32(rounded, dtype, tmp_path, capsys):
    ids = np.random.default_rng(0).integers(0, 256, 24)
    synthetic.write_checkpoint(tmp_path / "f32", *rounded, "original")
    synthetic.write_checkpoint(tmp_path / dtype, *rounded, "original", dtype=dtype)
    _, want = _logits(tmp_path / "f32", ids)
    model, got = _logits(tmp_path / dtype, ids)
    experts = model.language_model.model.layers[1].mlp.switch_mlp.gate_proj.weight
    assert experts.dtype == getattr(mx, dtype)
    # bf16 rounding between layers (and the odd routing flip it causes) stays small
    per_position = np.abs(got - want).max(-1) / np.abs(want).max()
    assert np.median(per_position) < 3e-2
    _generate(tmp_path / dtype, capsys)


def test_convert_to_bfloat16_then_generate(rounded, tmp_path, capsys):
    synthetic.write_checkpoint(tmp_path / "src", *rounded, "original")
    assert cli.main(["convert", "--hf-path", str(tmp_path / "src"), "--mlx-path", str(tmp_path / "out"),
                     "--dtype", "bfloat16", "--no-progress"]) == 0
    assert load_model(tmp_path / "out")[0].language_model.model.layers[1].mlp.switch_mlp.up_proj.weight.dtype \
        == mx.bfloat16
    _generate(tmp_path / "out", capsys)


def test_quantised_conversion_of_a_bf16_source_generates(bf16_source, tmp_path, capsys):
    # 64-wide groups: the tiny experts' 32-wide down projection stays unquantised bf16
    assert cli.main(["convert", "--hf-path", str(bf16_source), "--mlx-path", str(tmp_path / "q"), "-q",
                     "--no-progress"]) == 0
    capsys.readouterr()
    _generate(tmp_path / "q", capsys)
