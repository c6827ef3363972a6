"""The transformers reference (MiniMaxM3SparseForConditionalGeneration) built on given weights."""

from __future__ import annotations

import numpy as np
import torch
from transformers import MiniMaxM3SparseForConditionalGeneration
from transformers.models.minimax_m3_vl.configuration_minimax_m3_vl import MiniMaxM3VLConfig

torch.set_grad_enabled(False)


def build_reference(config: dict, weights: dict, seed: int = 0):
    """The reference in float32 with every text weight set from `weights` (transformers names).

    Returns (model, vision_state): vision weights come from the reference's own random init
    (seeded) so tests can write them into checkpoints and check they are set aside.
    """
    cfg = {k: v for k, v in config.items() if k not in ("quantization_config", "torch_dtype", "dtype")}
    hf_config = MiniMaxM3VLConfig(**cfg)
    hf_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = MiniMaxM3SparseForConditionalGeneration(hf_config).float().eval()
    state = model.state_dict()
    missing = [k for k in state if k not in weights and not _is_vision(k)]
    assert not missing, f"test weights lack {missing[:5]}"
    for k, v in weights.items():
        assert k in state, f"reference has no parameter {k}"
        assert tuple(state[k].shape) == tuple(v.shape), (k, state[k].shape, v.shape)
        state[k] = torch.from_numpy(np.asarray(v, np.float32))
    model.load_state_dict(state, strict=True)
    vision = {k: v.numpy().copy() for k, v in model.state_dict().items() if _is_vision(k)}
    return model, vision


def _is_vision(k: str) -> bool:
    return k.startswith(("model.vision_tower.", "model.multi_modal_projector."))


def reference_logits(model, tokens: np.ndarray) -> np.ndarray:
    out = model(input_ids=torch.from_numpy(np.asarray(tokens, np.int64)), use_cache=False)
    return out.logits.float().numpy()


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))
