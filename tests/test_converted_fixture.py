"""A folder converted by release 0.1.0 still loads and computes what that release computed.

tests/fixtures/converted_v0_1 was written by the converter of 0.1.0 (see its README): our
names, mlx-lm "quantization" with 8-bit per-module entries for the vision tower, and the
`model_file` shim that stock mlx-lm runs with trust_remote_code.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

import minimax_m3_mlx

FIXTURE = Path(__file__).parent / "fixtures" / "converted_v0_1"


def _expected():
    return np.load(FIXTURE / "expected.npz")


def _check(model, exp):
    logits = np.array(model(mx.array(exp["tokens"])).astype(mx.float32))
    np.testing.assert_allclose(logits, exp["logits"], rtol=1e-5, atol=1e-5)


def test_converted_folder_loads_with_our_loader():
    exp = _expected()
    model, config = minimax_m3_mlx.load_model(FIXTURE)
    assert config["model_file"] == "minimax_m3_model.py"
    assert model.has_vision
    _check(model, exp)
    emb = model.get_input_embeddings(exp["ids"], exp["pixel_values"], exp["grid"])
    np.testing.assert_allclose(np.array(emb.astype(mx.float32)), exp["embeddings"], rtol=1e-5, atol=1e-5)


def test_converted_folder_loads_through_the_model_file_shim():
    from mlx_lm.utils import load_model as mlx_lm_load_model

    model, _ = mlx_lm_load_model(FIXTURE, trust_remote_code=True)
    assert type(model).__module__.startswith("minimax_m3_mlx.model")  # ours, not mlx-lm's port
    _check(model, _expected())
