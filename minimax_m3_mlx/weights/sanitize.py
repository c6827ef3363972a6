"""Checkpoint I/O: every released on-disk layout mapped onto this package's parameter names.

Layouts (see DESIGN.md):
- original: `language_model.model.layers.N.block_sparse_moe.experts.E.w{1,2,3}`,
  `self_attn.index_{q,k}_{proj,norm}`, `language_model.lm_head`;
- transformers 5.x re-save: `model.language_model.*`, `lm_head`, `self_attn.indexer.*`,
  fused `mlp.experts.gate_up_proj` [E, 2I, H] / `down_proj` [E, H, I], fused
  `gate_up_proj.weight` in dense and shared MLPs;
- MXFP8 (`quant_method: mxfp8`, or `fp8` with `scale_fmt: ue8m0`): e4m3 bytes with one
  E8M0 exponent per 1x32 tile. That is MLX's `mxfp8` layout once the bytes are read as
  uint32, so those layers stay packed (no dequantisation, no copy);
- FP8 with float32 `weight_scale_inv` per 128x128 block (DeepSeek style), dequantised
  exactly per block, ragged edge blocks included;
- this package's own names (converted MLX models): passed through unchanged.
`mtp.*` tensors are dropped (the reference ignores them); vision tensors go to the vision
tower (vision.py), which is built when the checkpoint holds them. Anything else is an
error that names the tensor.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..config import ModelArgs
from ..model.vision import VISION_PREFIXES

DROPPED_PREFIXES = ("mtp.", "model.mtp.", "language_model.mtp.", "language_model.model.mtp.")
MX_BLOCK = 32
SUPPORTED_QUANT_METHODS = ("mxfp8", "fp8")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: the message names the file or tensor."""


_DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}


def model_dtype(args: ModelArgs):
    return _DTYPES.get(args.dtype, mx.bfloat16)


# -- safetensors files ---------------------------------------------------------------------
def read_safetensors_header(path: Path) -> dict:
    """The header of a safetensors file, after checking the file holds all its data."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated safetensors file (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file: its header needs {8 + n + end} bytes, the file has {size}"
        )
    return header


def weight_files(path: Path) -> List[Path]:
    """The shards of a checkpoint folder, checked against its index when there is one."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).exists()]
        if missing:
            raise CheckpointError(f"{index} names shard(s) that do not exist: {', '.join(missing)}")
        return [path / f for f in files]
    files = sorted(p for p in path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no .safetensors files in {path}")
    return files


def load_weights(path: Path) -> Dict[str, mx.array]:
    """All tensors of a checkpoint folder, memory-mapped lazily by MLX."""
    weights: Dict[str, mx.array] = {}
    index = path / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"] if index.exists() else None
    for f in weight_files(path):
        header = read_safetensors_header(f)
        shard = mx.load(str(f))
        if weight_map is not None:
            expected = {k for k, v in weight_map.items() if v == f.name}
            absent = sorted(expected - set(shard))
            if absent:
                raise CheckpointError(f"{f}: the index places {absent[:5]} here but the shard lacks them")
        dup = set(shard) & set(weights)
        if dup:
            raise CheckpointError(f"{f}: tensors also found in another shard: {sorted(dup)[:5]}")
        weights.update(shard)
        del header
    return weights


# -- quantised sources -------------------------------------------------------------------------
def _e8m0_to_float(s: mx.array) -> mx.array:
    return mx.power(mx.array(2.0, mx.float32), s.astype(mx.float32) - 127.0)


def dequantize_fp8_blocks(w: mx.array, scale: mx.array, block: Tuple[int, int], name: str, dtype) -> mx.array:
    """w (e4m3 bytes, [..., out, in]) times one scale per (bo x bi) block, edge blocks ragged."""
    bo, bi = block
    out_dim, in_dim = w.shape[-2:]
    expect = (*w.shape[:-2], -(-out_dim // bo), -(-in_dim // bi))
    if tuple(scale.shape) != expect:
        raise CheckpointError(
            f"{name}: scale shape {tuple(scale.shape)} does not fit weight {tuple(w.shape)} "
            f"with {bo}x{bi} blocks (expected {expect})"
        )
    s = _e8m0_to_float(scale) if scale.dtype == mx.uint8 else scale.astype(mx.float32)
    s = mx.repeat(mx.repeat(s, bo, axis=-2), bi, axis=-1)[..., :out_dim, :in_dim]
    return (mx.from_fp8(w, mx.float32) * s).astype(dtype)


def _quant_block(args: ModelArgs) -> Tuple[int, int]:
    qc = args.quantization_config or {}
    block = qc.get("weight_block_size") or ([1, MX_BLOCK] if qc.get("quant_method") == "mxfp8" else [128, 128])
    if len(block) != 2:
        raise CheckpointError(f"quantization_config.weight_block_size must have 2 entries, got {block}")
    return int(block[0]), int(block[1])


def unpack_quantized(args: ModelArgs, weights: Dict[str, mx.array]) -> Tuple[Dict[str, mx.array], set]:
    """Resolve `X.weight` + `X.weight_scale_inv` pairs: MX tiles stay packed, the rest dequantise.

    Returns the weights and the set of (source-named) module prefixes left as mxfp8.
    """
    scale_keys = [k for k in weights if k.endswith((".weight_scale_inv", ".weight_scale"))]
    qc = args.quantization_config
    method = (qc or {}).get("quant_method")
    if qc is not None and args.quantization is None and method not in SUPPORTED_QUANT_METHODS:
        raise CheckpointError(
            f"unsupported quantization_config.quant_method {method!r}: supported are "
            f"{', '.join(SUPPORTED_QUANT_METHODS)} (and MLX's own 'quantization')"
        )
    if not scale_keys:
        return weights, set()
    if qc is None:
        raise CheckpointError(f"{scale_keys[0]}: a quantisation scale, but config.json has no quantization_config")
    block = _quant_block(args)
    dtype = model_dtype(args)
    out = dict(weights)
    mx_packed = set()
    for sk in scale_keys:
        base = sk.rsplit(".", 1)[0]
        wk = f"{base}.weight"
        if wk not in out:
            raise CheckpointError(f"{sk}: scale without its weight {wk}")
        w, s = out.pop(wk), out.pop(sk)
        if w.dtype != mx.uint8:
            raise CheckpointError(f"{wk}: expected float8_e4m3 bytes next to {sk}, got {w.dtype}")
        if s.dtype == mx.uint8 and block == (1, MX_BLOCK):
            expect = (*w.shape[:-1], w.shape[-1] // MX_BLOCK)
            if w.shape[-1] % MX_BLOCK or tuple(s.shape) != expect:
                raise CheckpointError(
                    f"{sk}: E8M0 scale shape {tuple(s.shape)} does not fit weight {tuple(w.shape)} "
                    f"with 1x{MX_BLOCK} tiles (expected {expect})"
                )
            # e4m3 bytes + E8M0 per 1x32 is MLX's mxfp8: reinterpret, do not convert.
            out[wk] = w.view(mx.uint32)
            out[f"{base}.scales"] = s
            mx_packed.add(base)
        else:
            out[wk] = dequantize_fp8_blocks(w, s, block, sk, dtype)
    stray = [k for k, v in out.items() if v.dtype == mx.uint8 and not k.endswith(".scales")]
    if stray:
        raise CheckpointError(f"{stray[0]}: float8 weight without a weight_scale_inv")
    return out, mx_packed


# -- names ---------------------------------------------------------------------------------------
_RENAMES = [
    (re.compile(r"^model\.language_model\."), "language_model.model."),
    (re.compile(r"^lm_head\."), "language_model.lm_head."),
    (re.compile(r"\.block_sparse_moe\.e_score_correction_bias$"), ".mlp.gate.e_score_correction_bias"),
    (re.compile(r"\.block_sparse_moe\.(gate|shared_experts)\."), r".mlp.\1."),
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
    """The tensor part of sanitize, on a whole checkpoint or any self-contained part of one.

    A part must hold each weight with its scale, and, for per-expert tensors, exactly
    the experts named by `experts` (see _stack_experts). Returns (weights in this
    package's names, source module prefixes left packed as mxfp8).
    """
    weights = {k: v for k, v in weights.items() if not k.startswith(DROPPED_PREFIXES + VISION_PREFIXES)}
    weights, mx_packed = unpack_quantized(args, weights)
    weights = {rename(k): v for k, v in weights.items()}
    weights = _stack_experts(weights, args.num_local_experts, experts)
    weights = _split_fused(weights)
    if args.tie_word_embeddings:
        weights.pop("language_model.lm_head.weight", None)
    return weights, mx_packed


def sanitize(model, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
    from ..model.vision import sanitize_model_vision  # vision tensors (which sanitize_tensors sets aside)

    vision = sanitize_model_vision(model, weights)
    weights, mx_packed = sanitize_tensors(model.args, weights)
    weights.update(vision)
    if mx_packed:
        _quantize_mx_layers(model, weights)
    return weights


def _quantize_mx_layers(model: nn.Module, weights: Dict[str, mx.array]) -> None:
    """Switch the layers whose checkpoint tensors are MX-packed to mxfp8 quantised layers.

    Done here (not by the loader) so that mlx-lm's `load_model` also loads `fp8` +
    `ue8m0` checkpoints, which its own quantisation dispatch does not recognise.
    """

    def predicate(path, module):
        return hasattr(module, "to_quantized") and f"{path}.scales" in weights

    nn.quantize(model, group_size=MX_BLOCK, bits=8, mode="mxfp8", class_predicate=predicate)


# -- loading -------------------------------------------------------------------------------------
def apply_mlx_quantization(model: nn.Module, config: dict, weights: Dict[str, mx.array]) -> None:
    """Quantise the layers of a converted MLX model as its config says (mlx-lm's convention)."""
    q = config.get("quantization")
    if not q:
        return

    def predicate(path, module):
        if path in q:
            return q[path]
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        return True

    nn.quantize(model, group_size=q["group_size"], bits=q["bits"], mode=q.get("mode", "affine"),
                class_predicate=predicate)


def check_weights(model: nn.Module, weights: Dict[str, mx.array]) -> None:
    """Missing, extra or mis-shaped tensors, named, before anything is loaded."""
    params = dict(tree_flatten(model.parameters()))
    missing = sorted(set(params) - set(weights))
    extra = sorted(set(weights) - set(params))
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:5]}")
    if extra:
        raise CheckpointError(f"checkpoint has {len(extra)} tensor(s) the model does not use, e.g. {extra[:5]}")
    for k, p in params.items():
        if tuple(weights[k].shape) != tuple(p.shape):
            raise CheckpointError(f"{k}: shape {tuple(weights[k].shape)} in the checkpoint, model expects {tuple(p.shape)}")


def resolve_path(path_or_repo: str | Path) -> Path:
    """A local folder, or a Hugging Face repo id already in the local cache (no download)."""
    p = Path(path_or_repo).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{p} is a file; expected a checkpoint folder")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(path_or_repo), local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError, ValueError):
        raise CheckpointError(
            f"{path_or_repo}: not a local folder, and not a repo id in the local Hugging Face cache"
        ) from None


def load_model(path: str | Path, lazy: bool = False):
    """Build the model from a checkpoint folder in any supported layout -> (model, config)."""
    from ..model.model import Model

    path = resolve_path(path)
    args = ModelArgs.from_file(path)
    config = json.loads((path / "config.json").read_text())
    weights = load_weights(path)
    model = Model(args)
    weights = model.sanitize(weights)
    apply_mlx_quantization(model, config, weights)
    check_weights(model, weights)
    model.load_weights(list(weights.items()), strict=True)
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model, config


def load(path: str | Path, lazy: bool = False, tokenizer_config: Optional[dict] = None):
    """(model, tokenizer) from a local checkpoint folder, like `mlx_lm.load`."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    model, config = load_model(path, lazy=lazy)
    path = resolve_path(path)
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise CheckpointError(f"{path}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
    eos = config.get("eos_token_id", (config.get("text_config") or {}).get("eos_token_id"))
    eos = [eos] if isinstance(eos, int) else eos
    tokenizer = load_tokenizer(path, tokenizer_config or {}, eos_token_ids=eos)
    from ..chat_format.tokenizer import configure_tokenizer

    return model, configure_tokenizer(tokenizer)


def get_model_classes(config: dict = None):
    """For `mlx_lm.utils.load_model(path, get_model_classes=get_model_classes)`."""
    from ..model.model import Model

    return Model, ModelArgs
