"""Loading a whole checkpoint folder in any released layout, or a converted one -> (Model, config).

The steps, shared with the per-rank loader's dry run (sharded.inspect_checkpoint):
`prepare_model` builds the Model the checkpoint needs (with the vision tower when the
checkpoint holds its weights), maps the tensors to our names (weights/sanitize.py), gives
the model its quantised structure (MX-packed source layers as mxfp8, or a converted
model's mlx-lm "quantization") and checks every tensor's name and shape before a byte
is loaded.
"""

from __future__ import annotations

import inspect
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Dict, Optional, Tuple

import huggingface_hub
import mlx.core as mx
import mlx.nn as nn
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from mlx.utils import tree_flatten

from ..config import ModelArgs
from ..io import CheckpointError
from ..io.reader import load_arrays, read_header, weight_files
from ..model import Model
from ..weights.quant import MX_BLOCK
from ..weights.layouts import check_known_layout
from ..weights.mlx_quant import describe, infer_quantization
from ..weights.sanitize import has_vision_tensors, sanitize

log = logging.getLogger("minimax_m3_mlx")


def resolve_path(path_or_repo: str | Path) -> Path:
    """A local folder, or a Hugging Face repo id already in the local cache (no download)."""
    p = Path(path_or_repo).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{p} is a file; expected a checkpoint folder")
    try:
        return Path(huggingface_hub.snapshot_download(str(path_or_repo), local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError, ValueError):
        raise CheckpointError(
            f"{path_or_repo}: not a local folder, and not a repo id in the local Hugging Face cache"
        ) from None


def check_folder(path: Path) -> None:
    """What makes a folder unloadable, found from its config and file headers alone (the
    server checks before it listens: the weights load in its generation thread, where a
    failure could only be logged)."""
    args = ModelArgs.from_file(path)
    names = []
    for f in weight_files(path):
        names += [k for k in read_header(f)[0] if k != "__metadata__"]
    check_known_layout(args, names)
    problem = tokenizer_problem(path)
    if problem:
        raise CheckpointError(f"{path}: {problem}")


def tokenizer_problem(folder: Path) -> Optional[str]:
    """What `folder` lacks to build the tokenizer, or None. A tokenizer_config.json without
    tokenizer.json sends transformers after a slow tokenizer to convert, and its refusal
    talks of sentencepiece and tiktoken."""
    if any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        return None
    if (folder / "tokenizer_config.json").is_file():
        return "no tokenizer.json (tokenizer_config.json alone does not make the tokenizer)"
    return "no tokenizer files (tokenizer.json / tokenizer_config.json)"


def read_config(path: Path) -> Tuple[dict, ModelArgs]:
    """config.json as read, and the ModelArgs it describes (ConfigError naming the problem)."""
    args = ModelArgs.from_file(path)
    return json.loads((path / "config.json").read_text()), args


def quantize_packed(model: nn.Module, packed: set, weights: Dict[str, mx.array]) -> None:
    """Make the modules whose tensors are MX-packed mxfp8 quantised layers (weights stay as read).

    mlx-lm's own loader does this only for `quant_method: mxfp8`, not for `fp8` with
    `scale_fmt: ue8m0`, which is the same format.
    """
    if packed:
        def predicate(path, module):
            take = path in packed and hasattr(module, "to_quantized")
            if take:
                check_quantized_shape(path, module, weights, MX_BLOCK)
            return take

        nn.quantize(model, group_size=MX_BLOCK, bits=8, mode="mxfp8", class_predicate=predicate)


def check_quantized_shape(path: str, module: nn.Module, weights: Dict[str, mx.array], group_size: int) -> None:
    """A layer about to be quantised against its stored scales: the float shape config.json
    gives it must be the one the checkpoint was quantised from. Checked here because MLX's
    own refusal ("[quantize] The last dimension ...") names neither the layer nor the cause."""
    scales, weight = weights.get(f"{path}.scales"), getattr(module, "weight", None)
    if scales is None or weight is None:
        return
    stored = tuple(scales.shape[:-1]) + (scales.shape[-1] * group_size,)
    if stored != tuple(weight.shape):
        raise CheckpointError(f"{path}: quantised from shape {stored} in the checkpoint, model expects "
                              f"{tuple(weight.shape)} (config.json does not match the weights)")


def apply_mlx_quantization(model: nn.Module, weights: Dict[str, mx.array]) -> Dict[str, dict]:
    """Quantise each layer whose tensors (in our names) are MLX-quantized as they were written:
    the spec of every module is read back from its own tensors (weights/mlx_quant.py), so
    mixed per-module folders (ours, mlx-lm's, mlx-vlm's, in any mode) need no name mapping
    of their `quantization` block. Returns {module path: spec}."""
    specs: Dict[str, dict] = {}

    def predicate(path, module):
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights or f"{path}.weight" not in weights:
            return False
        spec = infer_quantization(path, module["weight"].shape[-1], weights)
        check_quantized_shape(path, module, weights, spec["group_size"])
        if spec.pop("global_scale", False) and "global_scale" in inspect.signature(module.to_quantized).parameters:
            spec["global_scale"] = True  # else the stray tensor is named by check_weights
        specs[path] = spec
        return spec

    nn.quantize(model, class_predicate=predicate)
    return specs


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


def prepare_model(config: dict, args: ModelArgs, arrays: Dict[str, mx.array]) -> Tuple[Model, Dict[str, mx.array]]:
    """The model `arrays` (a checkpoint's tensors, any layout) need, and the tensors in its names.

    Built with the vision tower only when the checkpoint holds vision weights; quantised as
    the checkpoint is; checked against the tensors. Nothing is evaluated or loaded here.
    """
    layout = check_known_layout(args, arrays)
    model = Model(replace(args, with_vision=has_vision_tensors(arrays)))
    weights, packed = sanitize(model.args, arrays, vision=model.has_vision)
    quantize_packed(model, packed, weights)
    specs = apply_mlx_quantization(model, weights)
    check_weights(model, weights)
    model.checkpoint_layout = f"{layout}; {describe(specs) if specs else 'mxfp8 source' if packed else 'unquantized'}"
    log.debug("checkpoint layout: %s", model.checkpoint_layout)
    return model, weights


def load_model(path: str | Path, lazy: bool = False):
    """Build the model from a checkpoint folder in any supported layout -> (model, config)."""
    path = resolve_path(path)
    config, args = read_config(path)
    model, weights = prepare_model(config, args, load_arrays(path))
    model.load_weights(list(weights.items()), strict=True)
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model, config


def get_model_classes(config: dict = None):
    """For `mlx_lm.utils.load_model(path, get_model_classes=get_model_classes)`."""
    return Model, ModelArgs
