"""Which on-disk layout a checkpoint is, from its tensor names alone.

Besides the releases (original, transformers 5.x re-save) and this package's converted
folders, Mac users hold folders written by mlx-lm's and mlx-vlm's own MiniMax-M3 ports
(`mlx_lm.convert`, mlx-vlm's convert, and the community 3/4/6-bit conversions made with
them). Their names:
- mlx-lm: `block_sparse_moe.switch_mlp.{gate,up,down}_proj` (experts stacked),
  `block_sparse_moe.{gate,shared_experts,e_score_correction_bias}`,
  `self_attn.index_{q,k}_{proj,norm}`; no vision tensors (its port drops them);
- mlx-vlm: the same, except that when the shared expert has the routed experts' size it is
  packed in as expert number E of `block_sparse_moe.switch_mlp.{gate_up_proj,down_proj}`
  (gate and up fused along the output rows); the vision tower under
  `vision_tower.vision_model.*` and `patch_merge_mlp.*`.
weights/sanitize.py maps each onto our names; weights/mlx_quant.py reads their per-module
quantization back from the tensors.
"""

from __future__ import annotations

from typing import Iterable

from ..config import ModelArgs
from ..io import CheckpointError

ORIGINAL = "original release (per-expert w1/w2/w3)"
RESAVE = "transformers 5.x re-save (model.language_model.*, fused experts)"
OURS = "minimax_m3_mlx conversion (mlp.switch_mlp.*, self_attn.indexer.*)"
MLX_LM = "mlx-lm conversion (minimax_m3_vl port: block_sparse_moe.switch_mlp.*, self_attn.index_*_proj)"
MLX_VLM = "mlx-vlm conversion (minimax_m3_vl port: shared expert packed into block_sparse_moe.switch_mlp)"

_EMBEDDINGS = ("language_model.model.embed_tokens.weight", "model.language_model.embed_tokens.weight")
_EXPERT_FORMS = ("block_sparse_moe.experts.N.w1", "mlp.experts.gate_up_proj",
                 "block_sparse_moe.switch_mlp.*", "mlp.switch_mlp.*")


def detect_layout(names: Iterable[str]) -> str:
    """The layout whose names `names` (a checkpoint's tensor names) use; one of the constants above."""
    names = list(names)

    def has(part: str) -> bool:
        return any(part in k for k in names)

    if has(".block_sparse_moe.switch_mlp.gate_up_proj.") or any(k.startswith("vision_tower.vision_model.")
                                                                 for k in names):
        return MLX_VLM
    if has(".block_sparse_moe.switch_mlp."):
        return MLX_LM
    if has(".mlp.switch_mlp.") or has(".self_attn.indexer."):
        return RESAVE if any(k.startswith("model.language_model.") for k in names) else OURS
    if any(k.startswith("model.language_model.") for k in names) or has(".mlp.experts.gate_up_proj"):
        return RESAVE
    if has(".block_sparse_moe.experts."):
        return ORIGINAL
    if has(".self_attn.index_q_proj.") and not any(".scales" in k for k in names):
        return ORIGINAL  # a checkpoint without MoE layers: the original's attention names
    return MLX_LM if has(".self_attn.index_q_proj.") else OURS


def check_known_layout(args: ModelArgs, names: Iterable[str]) -> str:
    """detect_layout, or one line naming what a folder that matches no known layout lacks."""
    names = list(names)
    if not any(k in names for k in _EMBEDDINGS):
        raise CheckpointError(f"matches no known MiniMax-M3 layout: it lacks the token embedding "
                              f"({' or '.join(_EMBEDDINGS)})")
    moe = [i for i in range(args.num_hidden_layers) if args.is_moe(i)]
    experts = (".block_sparse_moe.experts.", ".mlp.experts.", ".switch_mlp.")
    if moe and not any(p in k for k in names for p in experts):
        raise CheckpointError(f"matches no known MiniMax-M3 layout: it lacks the routed experts of its "
                              f"{len(moe)} MoE layer(s) in any known form ({', '.join(_EXPERT_FORMS)})")
    return detect_layout(names)
