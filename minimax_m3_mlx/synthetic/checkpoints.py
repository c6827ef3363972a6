"""Tiny random MiniMax-M3 checkpoints written in every released on-disk layout.

Used by the tests and the demo (nothing may download weights here). Weights are drawn in
transformers' names (the reference's state dict), every parameter perturbed: norm weights
and the router's score-correction bias are random, because a zero norm weight or bias
would hide exactly the bugs the tests are for. `write_checkpoint` then re-spells them in
a layout, quantising where the layout is quantised, and returns the dequantised float32
weights the reference must be given to compute the same function.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Dict, Optional, Tuple

import mlx.core as mx
import numpy as np

from ..io.writer import write_safetensors
from ..sizes import ceil_div
from .tokenizer import write_tiny_tokenizer

LAYOUTS = ("original", "resave", "mxfp8", "fp8_ue8m0", "fp8")

TINY_TEXT = {
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 32,
    "dense_intermediate_size": 96,
    "shared_intermediate_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "rotary_dim": 16,
    "partial_rotary_factor": 0.5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "routed_scaling_factor": 2.0,
    "swiglu_alpha": 1.702,
    "swiglu_limit": 7.0,
    "moe_layer_freq": [0, 1, 1, 1],
    "sparse_attention_config": {
        "sparse_attention_freq": [0, 1, 1, 1],
        "sparse_num_index_heads": 2,
        "sparse_index_dim": 32,
        "sparse_block_size": 4,
        "sparse_topk_blocks": 3,
        "sparse_local_block": 1,
    },
    "tie_word_embeddings": False,
    "bos_token_id": 257,
    "eos_token_id": 258,
}

TINY_VISION = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
    "num_channels": 3, "image_size": 56, "patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2,
}


def tiny_config(text_overrides: Optional[dict] = None, dtype: str = "float32") -> dict:
    """A published-style config.json (nested text_config, original key spellings)."""
    text = copy.deepcopy(TINY_TEXT)
    for k, v in (text_overrides or {}).items():
        if k == "sparse_attention_config":
            text[k].update(v)
        else:
            text[k] = v
    n = text["num_hidden_layers"]
    for key, sub in (("moe_layer_freq", None), ("sparse_attention_freq", "sparse_attention_config")):
        holder = text[sub] if sub else text
        if len(holder[key]) != n:
            holder[key] = (holder[key] + [holder[key][-1]] * n)[:n]
    return {
        "architectures": ["MiniMaxM3SparseForConditionalGeneration"],
        "model_type": "minimax_m3_vl",
        "text_config": text,
        "vision_config": copy.deepcopy(TINY_VISION),
        "image_token_index": 300,
        "video_token_index": 301,
        "projector_hidden_size": text["hidden_size"],
        "torch_dtype": dtype,
    }


def resave_config(config: dict) -> dict:
    """The same config spelled as a transformers 5.x re-save (flat per-layer/index keys)."""
    c = copy.deepcopy(config)
    t = c["text_config"]
    sac = t.pop("sparse_attention_config")
    t["layer_types"] = ["minimax_m3_sparse" if f else "full_attention" for f in sac["sparse_attention_freq"]]
    t["mlp_layer_types"] = ["sparse" if f else "dense" for f in t.pop("moe_layer_freq")]
    t["index_n_heads"] = sac["sparse_num_index_heads"]
    t["index_head_dim"] = sac["sparse_index_dim"]
    t["index_block_size"] = sac["sparse_block_size"]
    t["index_topk_blocks"] = sac["sparse_topk_blocks"]
    t["index_local_blocks"] = sac["sparse_local_block"]
    t["rope_parameters"] = {"rope_type": "default", "rope_theta": t.pop("rope_theta"),
                            "partial_rotary_factor": t.pop("partial_rotary_factor")}
    t.pop("rotary_dim")
    c["dtype"] = c.pop("torch_dtype")
    return c


# -- weights -------------------------------------------------------------------------------------
def text_shapes(config: dict) -> Dict[str, Tuple[int, ...]]:
    """transformers names and shapes of every text-model parameter."""
    t = config["text_config"]
    H, D, nh, nkv = t["hidden_size"], t["head_dim"], t["num_attention_heads"], t["num_key_value_heads"]
    sac = t["sparse_attention_config"]
    ih, idim = sac["sparse_num_index_heads"], sac["sparse_index_dim"]
    E, I = t["num_local_experts"], t["intermediate_size"]
    p = "model.language_model."
    shapes = {f"{p}embed_tokens.weight": (t["vocab_size"], H), f"{p}norm.weight": (H,)}
    if not t.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (t["vocab_size"], H)
    for i in range(t["num_hidden_layers"]):
        L = f"{p}layers.{i}."
        shapes.update({
            f"{L}input_layernorm.weight": (H,), f"{L}post_attention_layernorm.weight": (H,),
            f"{L}self_attn.q_proj.weight": (nh * D, H), f"{L}self_attn.k_proj.weight": (nkv * D, H),
            f"{L}self_attn.v_proj.weight": (nkv * D, H), f"{L}self_attn.o_proj.weight": (H, nh * D),
            f"{L}self_attn.q_norm.weight": (D,), f"{L}self_attn.k_norm.weight": (D,),
        })
        if sac["sparse_attention_freq"][i]:
            shapes.update({
                f"{L}self_attn.indexer.q_proj.weight": (ih * idim, H), f"{L}self_attn.indexer.k_proj.weight": (idim, H),
                f"{L}self_attn.indexer.q_norm.weight": (idim,), f"{L}self_attn.indexer.k_norm.weight": (idim,),
            })
        if t["moe_layer_freq"][i]:
            S = t["shared_intermediate_size"]
            shapes.update({
                f"{L}mlp.gate.weight": (E, H), f"{L}mlp.gate.e_score_correction_bias": (E,),
                f"{L}mlp.experts.gate_up_proj": (E, 2 * I, H), f"{L}mlp.experts.down_proj": (E, H, I),
                f"{L}mlp.shared_experts.gate_up_proj.weight": (2 * S, H),
                f"{L}mlp.shared_experts.down_proj.weight": (H, S),
            })
        else:
            Dn = t["dense_intermediate_size"]
            shapes.update({f"{L}mlp.gate_up_proj.weight": (2 * Dn, H), f"{L}mlp.down_proj.weight": (H, Dn)})
    return shapes


def random_weights(config: dict, seed: int = 0) -> Dict[str, np.ndarray]:
    """Random float32 text weights in transformers' names; nothing left at zero or one."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in text_shapes(config).items():
        if name.endswith("norm.weight"):
            w = rng.normal(0.0, 0.3, shape)  # Gemma norm: scale is 1 + w
        elif name.endswith("e_score_correction_bias"):
            w = rng.normal(0.0, 0.15, shape)  # comparable to sigmoid score gaps: changes choices
        elif name.endswith("embed_tokens.weight"):
            w = rng.normal(0.0, 1.0, shape)
        else:
            fan_in = shape[-1]
            w = rng.normal(0.0, 1.0 / np.sqrt(fan_in), shape)
        out[name] = w.astype(np.float32)
    return out


def vision_shapes(config: dict) -> Dict[str, Tuple[int, ...]]:
    """transformers names and shapes of every vision-tower and projector parameter."""
    v, H = config["vision_config"], config["text_config"]["hidden_size"]
    Vh, Vi, P = v["hidden_size"], v["intermediate_size"], config["projector_hidden_size"]
    m, ps = v["spatial_merge_size"], v["patch_size"]
    t, p = "model.vision_tower.", "model.multi_modal_projector."
    shapes = {f"{t}embeddings.proj.weight": (Vh, v["num_channels"], v["temporal_patch_size"], ps, ps),
              f"{t}pre_layrnorm.weight": (Vh,), f"{t}pre_layrnorm.bias": (Vh,)}
    for i in range(v["num_hidden_layers"]):
        L = f"{t}layers.{i}."
        for name in ("k_proj", "v_proj", "q_proj", "out_proj"):
            shapes.update({f"{L}self_attn.{name}.weight": (Vh, Vh), f"{L}self_attn.{name}.bias": (Vh,)})
        shapes.update({f"{L}mlp.fc1.weight": (Vi, Vh), f"{L}mlp.fc1.bias": (Vi,),
                       f"{L}mlp.fc2.weight": (Vh, Vi), f"{L}mlp.fc2.bias": (Vh,)})
        for norm in ("layer_norm1", "layer_norm2"):
            shapes.update({f"{L}{norm}.weight": (Vh,), f"{L}{norm}.bias": (Vh,)})
    for name, shape in (("linear_1", (P, Vh)), ("linear_2", (H, P)), ("merge_linear_1", (P, H * m * m)),
                        ("merge_linear_2", (H, P))):
        shapes.update({f"{p}{name}.weight": shape, f"{p}{name}.bias": shape[:1]})
    return shapes


def random_vision_weights(config: dict, seed: int = 0) -> Dict[str, np.ndarray]:
    """Random float32 vision-tower and projector weights in transformers' names."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in vision_shapes(config).items():
        if "norm" in name and name.endswith(".weight"):
            w = 1.0 + rng.normal(0.0, 0.3, shape)  # LayerNorm: scale is w itself
        elif name.endswith(".bias"):
            w = rng.normal(0.0, 0.2, shape)
        else:
            w = rng.normal(0.0, 1.0 / np.sqrt(np.prod(shape[1:])), shape)
        out[name] = w.astype(np.float32)
    return out


# -- layouts --------------------------------------------------------------------------------------
def to_original_names(weights: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """transformers names -> the published checkpoint's names (per-expert w1/w3/w2)."""
    out = {}
    for k, v in weights.items():
        if k.startswith("model.language_model."):
            k = "language_model.model." + k[len("model.language_model."):]
        elif k == "lm_head.weight":
            k = "language_model.lm_head.weight"
        elif k.startswith("model.vision_tower.") or k.startswith("model.multi_modal_projector."):
            out[_vision_original_name(k)] = v
            continue
        k = k.replace(".self_attn.indexer.", ".self_attn.index_")
        if ".mlp.experts.gate_up_proj" in k:
            base = k.replace(".mlp.experts.gate_up_proj", ".block_sparse_moe.experts")
            gate, up = np.split(v, 2, axis=1)
            for e in range(v.shape[0]):
                out[f"{base}.{e}.w1.weight"] = np.ascontiguousarray(gate[e])
                out[f"{base}.{e}.w3.weight"] = np.ascontiguousarray(up[e])
            continue
        if ".mlp.experts.down_proj" in k:
            base = k.replace(".mlp.experts.down_proj", ".block_sparse_moe.experts")
            for e in range(v.shape[0]):
                out[f"{base}.{e}.w2.weight"] = np.ascontiguousarray(v[e])
            continue
        if ".mlp.gate.e_score_correction_bias" in k:
            out[k.replace(".mlp.gate.e_score_correction_bias", ".block_sparse_moe.e_score_correction_bias")] = v
            continue
        k = k.replace(".mlp.gate.weight", ".block_sparse_moe.gate.weight")
        k = k.replace(".mlp.shared_experts.", ".block_sparse_moe.shared_experts.")
        if k.endswith(".gate_up_proj.weight"):
            gate, up = np.split(v, 2, axis=0)
            out[k.replace(".gate_up_proj.", ".gate_proj.")] = gate
            out[k.replace(".gate_up_proj.", ".up_proj.")] = up
            continue
        out[k] = v
    return out


def _vision_original_name(k: str) -> str:
    k = k.replace("model.vision_tower.embeddings.proj.", "vision_tower.vision_model.embeddings.patch_embedding.")
    k = k.replace("model.vision_tower.layers.", "vision_tower.vision_model.encoder.layers.")
    k = k.replace("model.vision_tower.pre_layrnorm.", "vision_tower.vision_model.pre_layrnorm.")
    k = k.replace("model.multi_modal_projector.merge_linear_", "patch_merge_mlp.linear_")
    k = k.replace("model.multi_modal_projector.linear_", "multi_modal_projector.linear_")
    return k


def _is_fp8_target(name: str) -> bool:
    """Which original-layout tensors the official MXFP8 release quantises."""
    if not name.startswith("language_model.model.layers.") or not name.endswith(".weight"):
        return False
    if "norm" in name or ".index_" in name or name.endswith("block_sparse_moe.gate.weight"):
        return False
    return True


def _to_fp8_bytes(x: np.ndarray) -> np.ndarray:
    return np.array(mx.to_fp8(mx.array(x.astype(np.float32))))


def _from_fp8_bytes(b: np.ndarray) -> np.ndarray:
    return np.array(mx.from_fp8(mx.array(b), mx.float32))


def quantize_mxfp8(w: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OCP MXFP8: e4m3 bytes and one E8M0 exponent per 1x32 tile -> (bytes, scales, dequantised)."""
    rows = w.reshape(*w.shape[:-1], w.shape[-1] // 32, 32).astype(np.float32)
    amax = np.abs(rows).max(axis=-1)
    # shared exponent = floor(log2(amax)) - emax(e4m3 = 8), as the OCP spec defines it
    e = np.where(amax > 0, np.floor(np.log2(np.maximum(amax, 1e-30))) - 8, -127)
    e = np.clip(e, -127, 127)
    scale = np.exp2(e)[..., None]
    q = _to_fp8_bytes(rows / scale)
    deq = _from_fp8_bytes(q) * scale
    return q.reshape(w.shape), (e + 127).astype(np.uint8), deq.reshape(w.shape).astype(np.float32)


def quantize_fp8_blocks(w: np.ndarray, block: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DeepSeek-style FP8: e4m3 bytes and a float32 scale per (bo x bi) block, edges ragged."""
    bo, bi = block
    out_dim, in_dim = w.shape
    so, si = ceil_div(out_dim, bo), ceil_div(in_dim, bi)
    scale = np.zeros((so, si), np.float32)
    for i in range(so):
        for j in range(si):
            blk = w[i * bo:(i + 1) * bo, j * bi:(j + 1) * bi]
            scale[i, j] = max(np.abs(blk).max(), 1e-12) / 448.0
    full = np.repeat(np.repeat(scale, bo, 0), bi, 1)[:out_dim, :in_dim]
    q = _to_fp8_bytes(w / full)
    return q, scale, (_from_fp8_bytes(q) * full).astype(np.float32)


def layout_tensors(config: dict, weights: Dict[str, np.ndarray], layout: str,
                   fp8_block: Tuple[int, int] = (128, 128)):
    """(tensors to write {name: (array, safetensors dtype)}, config to write, reference weights)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")
    config = copy.deepcopy(config)
    reference = dict(weights)
    if layout == "resave":
        return {k: (v, "F32") for k, v in weights.items()}, resave_config(config), reference
    original = to_original_names(weights)
    if layout == "original":
        return {k: (v, "F32") for k, v in original.items()}, config, reference
    tensors = {}
    dequantised = {}
    for k, v in original.items():
        if not _is_fp8_target(k):
            tensors[k] = (v, "F32")
            continue
        if layout == "fp8":
            q, s, deq = quantize_fp8_blocks(v, fp8_block)
            tensors[f"{k[:-len('.weight')]}.weight_scale_inv"] = (s, "F32")
        else:
            q, s, deq = quantize_mxfp8(v)
            tensors[f"{k[:-len('.weight')]}.weight_scale_inv"] = (s, "U8")
        tensors[k] = (q, "F8_E4M3")
        dequantised[k] = deq
    if layout == "mxfp8":
        config["quantization_config"] = {
            "quant_method": "mxfp8", "weight_block_size": [1, 32],
            "ignored_layers": ["language_model.lm_head", "language_model.model.embed_tokens", "vision_tower"],
        }
    elif layout == "fp8_ue8m0":
        config["quantization_config"] = {"quant_method": "fp8", "scale_fmt": "ue8m0", "weight_block_size": [1, 32]}
    else:
        config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": list(fp8_block)}
    reference = from_original_names(dequantised, weights)
    return tensors, config, reference


def from_original_names(dequantised: Dict[str, np.ndarray], weights: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Put dequantised original-named tensors back into the transformers-named dict."""
    ref = dict(weights)
    orig = to_original_names(weights)
    orig.update(dequantised)
    for name in weights:
        if name.endswith("mlp.experts.gate_up_proj"):
            base = name.replace("model.language_model.", "language_model.model.").replace(
                ".mlp.experts.gate_up_proj", ".block_sparse_moe.experts")
            E = weights[name].shape[0]
            ref[name] = np.stack([np.concatenate([orig[f"{base}.{e}.w1.weight"], orig[f"{base}.{e}.w3.weight"]], 0)
                                  for e in range(E)])
        elif name.endswith("mlp.experts.down_proj"):
            base = name.replace("model.language_model.", "language_model.model.").replace(
                ".mlp.experts.down_proj", ".block_sparse_moe.experts")
            ref[name] = np.stack([orig[f"{base}.{e}.w2.weight"] for e in range(weights[name].shape[0])])
        elif name.endswith(".gate_up_proj.weight"):
            o = name.replace("model.language_model.", "language_model.model.").replace(
                ".mlp.shared_experts.", ".block_sparse_moe.shared_experts.")
            ref[name] = np.concatenate([orig[o.replace(".gate_up_proj.", ".gate_proj.")],
                                        orig[o.replace(".gate_up_proj.", ".up_proj.")]], 0)
        else:
            o = to_original_names({name: weights[name]})
            if len(o) == 1:
                (oname,) = o
                ref[name] = orig.get(oname, weights[name])
    return ref


# -- files ------------------------------------------------------------------------------------------
def bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> the bit patterns of bfloat16 (round to nearest even), as uint16."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)


def round_to_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    """x as float32 after a round trip through `dtype` ("float32", "bfloat16", "float16")."""
    if dtype == "bfloat16":
        return (bfloat16_bits(x).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32) if dtype == "float16" else x


def write_checkpoint(path, config: dict, weights: Dict[str, np.ndarray], layout: str = "original",
                     shard_bytes: int = 1 << 20, fp8_block: Tuple[int, int] = (128, 128),
                     tokenizer: bool = True, dtype: str = "float32") -> Dict[str, np.ndarray]:
    """Write a sharded checkpoint (+ index, config, tokenizer); returns the reference weights.

    dtype: the float tensors' dtype on disk ("bfloat16" / "float16" as the real releases;
    FP8 scales stay float32); the config then says so. Callers that compare with a float32
    reference pass weights already rounded with `round_to_dtype`.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, cfg, reference = layout_tensors(config, weights, layout, fp8_block)
    if dtype != "float32":
        tag = {"bfloat16": "BF16", "float16": "F16"}[dtype]
        tensors = {k: ((bfloat16_bits(v) if tag == "BF16" else v), tag)
                   if t == "F32" and not k.endswith("_scale_inv") else (v, t) for k, (v, t) in tensors.items()}
        cfg["dtype" if "dtype" in cfg else "torch_dtype"] = dtype
        if isinstance(cfg.get("text_config"), dict):
            for key in ("dtype", "torch_dtype"):
                if key in cfg["text_config"]:
                    cfg["text_config"][key] = dtype
    shards, cur, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name][0].nbytes
        if cur and size + nbytes > shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = tensors[name]
        size += nbytes
    shards.append(cur)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(path / fname, shard, {"format": "pt"})
        for name, (arr, _) in shard.items():
            weight_map[name] = fname
            total += arr.nbytes
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    if tokenizer:
        write_tiny_tokenizer(path, cfg)
    return reference
