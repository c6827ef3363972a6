"""Every released on-disk layout mapped onto this package's parameter names.

Layouts:
- original: `language_model.model.layers.N.block_sparse_moe.experts.E.w{1,2,3}`,
  `self_attn.index_{q,k}_{proj,norm}`, `language_model.lm_head`;
- transformers 5.x re-save: `model.language_model.*`, `lm_head`, `self_attn.indexer.*`,
  fused `mlp.experts.gate_up_proj` [E, 2I, H] / `down_proj` [E, H, I], fused
  `gate_up_proj.weight` in dense and shared MLPs;
- MXFP8 / FP8 sources (see quant.py): MX tiles kept packed, 128x128 FP8 dequantised;
- this package's own names (converted MLX models): passed through unchanged;
- mlx-lm's and mlx-vlm's ports (see layouts.py): `block_sparse_moe.switch_mlp.*` stacked
  experts renamed, mlx-vlm's packed shared expert and fused gate/up split out exactly
  (along the expert axis and the output rows, never a quantized axis); their quantized
  tensors stay as written (mlx_quant.py reads each module's spec back).
`mtp.*` tensors are dropped (the reference ignores them); vision tensors are mapped by
vision_names.py when the model has a tower and left out otherwise. Anything else the
model does not know is caught by the loader's check, which names the tensor.
"""

from __future__ import annotations

import re
from typing import Dict, Optional, Sequence, Tuple

import mlx.core as mx

from ..config import ModelArgs
from ..io import CheckpointError
from .quant import dequantize_packed, model_dtype, unpack_quantized
from .vision_names import VISION_PREFIXES, sanitize_vision

DROPPED_PREFIXES = ("mtp.", "model.mtp.", "language_model.mtp.", "language_model.model.mtp.")

_RENAMES = [
    (re.compile(r"^model\.language_model\."), "language_model.model."),
    (re.compile(r"^lm_head\."), "language_model.lm_head."),
    (re.compile(r"\.block_sparse_moe\.e_score_correction_bias$"), ".mlp.gate.e_score_correction_bias"),
    (re.compile(r"\.block_sparse_moe\.(gate|shared_experts|switch_mlp)\."), r".mlp.\1."),
    # mlx-lm's port reads a dense layer's MLP kept under block_sparse_moe in some exports
    (re.compile(r"\.block_sparse_moe\.(gate_proj|up_proj|down_proj)\."), r".mlp.\1."),
    (re.compile(r"\.self_attn\.index_(q|k)_(proj|norm)\."), r".self_attn.indexer.\1_\2."),
]
_EXPERT = re.compile(r"^(.*)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.(weight|scales|biases)$")
_EXPERT_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def rename(key: str) -> str:
    for pattern, repl in _RENAMES:
        key = pattern.sub(repl, key)
    return key


def _stack_experts(weights: Dict[str, mx.array], n_experts: int,
                   experts: Optional[Sequence[int]] = None) -> Dict[str, mx.array]:
    """Per-expert w1/w3/w2 tensors -> one [E, ...] tensor per projection (SwitchGLU layout).

    `experts` (default: all of range(n_experts)) are the expert indices `weights` must
    hold, stacked in that order: the streaming converter passes one expert at a time and
    gets that expert's [1, ...] slice of each stacked tensor.
    """
    expected = list(range(n_experts)) if experts is None else list(experts)
    groups: Dict[Tuple[str, str, str], Dict[int, mx.array]] = {}
    out = {}
    for k, v in weights.items():
        m = _EXPERT.match(k)
        if m is None:
            out[k] = v
            continue
        prefix, e, w, part = m.groups()
        groups.setdefault((prefix, w, part), {})[int(e)] = v
    for (prefix, w, part), found in sorted(groups.items()):
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(range(n_experts)))
        if missing or extra:
            what = f"missing experts {missing[:8]}" if missing else f"experts beyond num_local_experts: {extra[:8]}"
            raise CheckpointError(f"{prefix}.block_sparse_moe.experts.*.{w}.{part}: {what}")
        out[f"{prefix}.mlp.switch_mlp.{_EXPERT_NAMES[w]}.{part}"] = mx.stack([found[e] for e in expected])
    return out


def _split_switch_packed(weights: Dict[str, mx.array], n_experts: int) -> Dict[str, mx.array]:
    """mlx-vlm's `switch_mlp.gate_up_proj` [E(+1), 2I, H'] and `down_proj` [E+1, H, I']: expert
    number E is the shared expert (packed in when it has the routed experts' size). Split
    along the expert axis and gate/up along the output rows: exact for quantized tensors too
    (packing runs along the input axis). The gate/up halves are strided views: made
    contiguous once here rather than copied by every gather_qmm. The routed down_proj stays a
    view of its buffer (no copy), which keeps the shared expert's 1/(E+1) of it alive beside
    the shared expert's own copy: 0.8% of down_proj's bytes for the real model's 128 experts."""
    out = {}
    for k, v in weights.items():
        m = re.match(r"^(.*\.mlp\.)switch_mlp\.(gate_up_proj|down_proj)\.(weight|scales|biases)$", k)
        if m is None or (m.group(2) == "down_proj" and v.shape[0] != n_experts + 1):
            out[k] = v
            continue
        base, proj, part = m.groups()
        if v.shape[0] not in (n_experts, n_experts + 1):
            raise CheckpointError(f"{k}: {v.shape[0]} experts along axis 0; the config has {n_experts} "
                                  f"(mlx-vlm packs the shared expert as one more)")
        routed, shared = v[:n_experts], (v[n_experts] if v.shape[0] > n_experts else None)
        if proj == "down_proj":
            out[f"{base}switch_mlp.down_proj.{part}"] = routed
            out[f"{base}shared_experts.down_proj.{part}"] = mx.contiguous(shared)
            continue
        for owner, t in (("switch_mlp", routed), ("shared_experts", shared)):
            if t is not None:
                gate, up = mx.split(t, 2, axis=-2)
                out[f"{base}{owner}.gate_proj.{part}"] = mx.contiguous(gate)
                out[f"{base}{owner}.up_proj.{part}"] = mx.contiguous(up)
    return out


def _split_fused(weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
    """transformers 5.x fused tensors -> separate gate/up (and SwitchGLU names for experts)."""
    out = {}
    for k, v in weights.items():
        if k.endswith(".mlp.experts.gate_up_proj"):  # [E, 2I, H]
            base = k[: -len("experts.gate_up_proj")]
            gate, up = mx.split(v, 2, axis=-2)
            out[f"{base}switch_mlp.gate_proj.weight"] = gate
            out[f"{base}switch_mlp.up_proj.weight"] = up
        elif k.endswith(".mlp.experts.down_proj"):  # [E, H, I]
            out[k[: -len("experts.down_proj")] + "switch_mlp.down_proj.weight"] = v
        elif ".gate_up_proj." in k:  # dense or shared MLP: [2I, H] (and its scales)
            base, part = k.split(".gate_up_proj.")
            gate, up = mx.split(v, 2, axis=0)
            out[f"{base}.gate_proj.{part}"] = gate
            out[f"{base}.up_proj.{part}"] = up
        else:
            out[k] = v
    return out


def sanitize_tensors(args: ModelArgs, weights: Dict[str, mx.array],
                     experts: Optional[Sequence[int]] = None) -> Tuple[Dict[str, mx.array], set]:
    """The text tensors of a whole checkpoint or of any self-contained part of one -> our names.

    A part must hold each weight with its scale, and, for per-expert tensors, exactly
    the experts named by `experts` (see _stack_experts). Vision and mtp tensors are left
    out. Returns (weights in this package's names, source module prefixes left packed as mxfp8).
    """
    weights = {k: v for k, v in weights.items() if not k.startswith(DROPPED_PREFIXES + VISION_PREFIXES)}
    weights, mx_packed = unpack_quantized(args, weights)
    weights = {rename(k): v for k, v in weights.items()}
    weights = _stack_experts(weights, args.num_local_experts, experts)
    weights = _split_switch_packed(weights, args.num_local_experts)
    weights = _split_fused(weights)
    if args.tie_word_embeddings:
        weights.pop("language_model.lm_head.weight", None)
    return weights, mx_packed


def vision_tensors(args: ModelArgs, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
    """The vision tensors of `weights` in our names. A source that quantised them (the releases
    leave them in BF16) is dequantised: the tower is small and stays at full precision."""
    vision = {k: v for k, v in weights.items() if k.startswith(VISION_PREFIXES)}
    if any(k.endswith((".weight_scale_inv", ".weight_scale")) for k in vision):
        vision, packed = unpack_quantized(args, vision)
        vision = dequantize_packed(vision, packed, model_dtype(args))
    return sanitize_vision(vision)


def has_vision_tensors(names) -> bool:
    return any(k.startswith(VISION_PREFIXES) for k in names)


def sanitize(args: ModelArgs, weights: Dict[str, mx.array], *, vision: bool,
             keep_packed: bool = True) -> Tuple[Dict[str, mx.array], set]:
    """A whole checkpoint -> (weights in our names, module paths left packed as mxfp8).

    vision: map the vision tensors (for a model with a tower); without it they are left out.
    keep_packed: leave MX-packed layers packed (the caller makes those modules mxfp8);
    otherwise they are dequantised to the model dtype.
    """
    text, packed = sanitize_tensors(args, weights)
    # Packed modules, in our names (experts stacked): the ones with `.scales` beside the weight.
    packed = {k[: -len(".scales")] for k in text if k.endswith(".scales")} if packed else set()
    if packed and not keep_packed:
        text, packed = dequantize_packed(text, packed, model_dtype(args)), set()
    if vision:
        text.update(vision_tensors(args, weights))
    return text, packed
