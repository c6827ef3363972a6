"""Vision tensor names: the published and transformers 5.x spellings -> this package's.

Ours are transformers' without the leading `model.`:
`vision_tower.embeddings.proj.weight` [E, C, T, P, P], `vision_tower.pre_layrnorm.*`,
`vision_tower.layers.N.{self_attn.{q,k,v,out}_proj, layer_norm1, layer_norm2, mlp.fc1, mlp.fc2}.*`,
`multi_modal_projector.{linear_1, linear_2, merge_linear_1, merge_linear_2}.*`.
"""

from __future__ import annotations

import re
from typing import Dict

import mlx.core as mx

from ..io import CheckpointError

# Where vision tensors live in any layout (the published one, transformers 5.x, ours).
VISION_PREFIXES = (
    "vision_tower.", "multi_modal_projector.", "patch_merge_mlp.",
    "model.vision_tower.", "model.multi_modal_projector.",
)

_RENAMES = [
    (re.compile(r"^model\.vision_tower\."), "vision_tower."),
    (re.compile(r"^model\.multi_modal_projector\."), "multi_modal_projector."),
    (re.compile(r"^vision_tower\.vision_model\.embeddings\.patch_embedding\."), "vision_tower.embeddings.proj."),
    (re.compile(r"^vision_tower\.vision_model\.encoder\.layers\."), "vision_tower.layers."),
    (re.compile(r"^vision_tower\.vision_model\.pre_layrnorm\."), "vision_tower.pre_layrnorm."),
    (re.compile(r"^patch_merge_mlp\.linear_"), "multi_modal_projector.merge_linear_"),
]
_PARAM = r"(weight|bias|scales|biases)"
_OURS = re.compile(
    r"^(vision_tower\.embeddings\.proj\.weight"
    r"|vision_tower\.pre_layrnorm\.(weight|bias)"
    r"|vision_tower\.layers\.\d+\.(layer_norm[12]\.(weight|bias)"
    rf"|self_attn\.(q|k|v|out)_proj\.{_PARAM}|mlp\.fc[12]\.{_PARAM})"
    rf"|multi_modal_projector\.(merge_)?linear_[12]\.{_PARAM})$"
)


def is_vision(name: str) -> bool:
    return name.startswith(VISION_PREFIXES)


def vision_name(key: str) -> str:
    """One vision tensor's name (published, transformers 5.x, or ours) -> ours."""
    for pattern, repl in _RENAMES:
        key = pattern.sub(repl, key)
    return key


def sanitize_vision(weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
    """Vision tensors in any layout -> this package's names; an unknown vision name is an error.

    FP8 pairs (`weight` + `weight_scale_inv`) must already be resolved (weights.sanitize does).
    """
    out = {}
    for k, v in weights.items():
        name = vision_name(k)
        if not _OURS.match(name):
            raise CheckpointError(f"{k}: a vision tensor this model does not know (read as {name})")
        if name in out:
            raise CheckpointError(f"{k}: the checkpoint holds {name} twice (in two naming layouts)")
        if name == "vision_tower.embeddings.proj.weight" and v.ndim != 5:
            raise CheckpointError(f"{k}: the patch embedding must be the Conv3d's [E, C, T, P, P] weight, "
                                  f"got shape {tuple(v.shape)}")
        out[name] = v
    return out
