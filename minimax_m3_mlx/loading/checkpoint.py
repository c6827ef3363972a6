"""Loading a whole checkpoint folder in any released layout, or a converted one -> (Model, config).

The steps, shared with the per-rank loader's dry run (sharded.inspect_checkpoint):
`prepare_model` builds the Model the checkpoint needs (with the vision tower when the
checkpoint holds its weights), maps the tensors to our names (weights/sanitize.py), gives
the model its quantised structure (MX-packed source layers as mxfp8, or a converted
model's mlx-lm "quantization") and checks every tensor's name and shape before a byte
is loaded.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

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
from ..weights.sanitize import has_vision_tensors, sanitize
from .streamed import check_expert_memory, stream_experts


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


def check_folder(path: Path, expert_memory: Optional[Union[int, str]] = None) -> None:
    """What makes a folder unloadable, found from its config and file headers alone (the
    server checks before it listens: the weights load in its generation thread, where a
    failure could only be logged); with `expert_memory`, what --expert-memory would refuse."""
    args = ModelArgs.from_file(path)
    if expert_memory is not None:
        check_expert_memory(path, args, expert_memory)
    for f in weight_files(path):
        read_header(f)
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise CheckpointError(f"{path}: no tokenizer files (tokenizer.json / tokenizer_config.json)")


def read_config(path: Path) -> Tuple[dict, ModelArgs]:
    """config.json as read, and the ModelArgs it describes (ConfigError naming the problem)."""
    args = ModelArgs.from_file(path)
    return json.loads((path / "config.json").read_text()), args


def quantize_packed(model: nn.Module, packed: set) -> None:
    """Make the modules whose tensors are MX-packed mxfp8 quantised layers (weights stay as read).

    mlx-lm's own loader does this only for `quant_method: mxfp8`, not for `fp8` with
    `scale_fmt: ue8m0`, which is the same format.
    """
    if packed:
        nn.quantize(model, group_size=MX_BLOCK, bits=8, mode="mxfp8",
                    class_predicate=lambda path, module: path in packed and hasattr(module, "to_quantized"))


def apply_mlx_quantization(model: nn.Module, config: dict, weights: Dict[str, mx.array]) -> None:
    """Quantise the layers of a converted MLX model as its config says (mlx-lm's convention)."""
    q = config.get("quantization")
    if not q:
        return

    def predicate(path, module):
        if path in q:
            return q[path]
        return hasattr(module, "to_quantized") and f"{path}.scales" in weights

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


def prepare_model(config: dict, args: ModelArgs, arrays: Dict[str, mx.array]) -> Tuple[Model, Dict[str, mx.array]]:
    """The model `arrays` (a checkpoint's tensors, any layout) need, and the tensors in its names.

    Built with the vision tower only when the checkpoint holds vision weights; quantised as
    the checkpoint is; checked against the tensors. Nothing is evaluated or loaded here.
    """
    model = Model(replace(args, with_vision=has_vision_tensors(arrays)))
    weights, packed = sanitize(model.args, arrays, vision=model.has_vision)
    quantize_packed(model, packed)
    apply_mlx_quantization(model, config, weights)
    check_weights(model, weights)
    return model, weights


def load_model(path: str | Path, lazy: bool = False, expert_memory: Optional[Union[int, str]] = None):
    """Build the model from a checkpoint folder in any supported layout -> (model, config).

    expert_memory: bytes (or "auto") of routed experts to hold in memory, the rest read
    from the folder's files as the router asks for them (streamed.py); a converted folder.
    """
    path = resolve_path(path)
    config, args = read_config(path)
    model, weights = prepare_model(config, args, load_arrays(path))
    if expert_memory is not None:
        weights = stream_experts(model, path, weights, expert_memory)
    model.load_weights(list(weights.items()), strict=True)
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model, config


def get_model_classes(config: dict = None):
    """For `mlx_lm.utils.load_model(path, get_model_classes=get_model_classes)`."""
    return Model, ModelArgs
