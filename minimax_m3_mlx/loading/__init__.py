"""Loading: one `load` for a whole model or this rank's part of it, with MiniMax-M3's tokenizer.

`load_model` (checkpoint.py) builds a whole model from any released layout or a converted
folder; `load_sharded` (sharded.py) loads one rank's part under `mlx.launch`; `load` picks
between them by the group's size and adds the tokenizer with MiniMax-M3's chat conventions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from mlx_lm.tokenizer_utils import load as load_tokenizer

from ..chat_format.tokenizer import configure_tokenizer
from ..io import CheckpointError
from . import checkpoint
from .checkpoint import get_model_classes, load_model, resolve_path, tokenizer_problem
from .sharded import check_experts, load_sharded

__all__ = ["load", "load_model", "load_sharded", "get_model_classes", "resolve_path", "check_folder"]


def load(path: str | Path, lazy: bool = False, tokenizer_config: Optional[dict] = None, *,
         group=None, mode: str = "tensor", tensor: Optional[int] = None, thinking: Optional[str] = None,
         expert_memory: Optional[Union[int, str]] = None):
    """(model, tokenizer) from a checkpoint folder, like `mlx_lm.load`.

    The first three parameters keep 0.1.0's positional order (`load(path, lazy,
    tokenizer_config)`); the rest are keyword-only.

    group: an mx.distributed Group of more than one rank (e.g. `mx.distributed.init()`
    under `mlx.launch`) loads only this rank's part, split as `mode` says ("tensor",
    "pipeline", "both" with `tensor` ranks per stage: see sharded.load_sharded); otherwise
    the whole model. The tokenizer gets MiniMax-M3's markers, tool parser and `thinking`
    as its default thinking mode (chat_format.tokenizer.configure_tokenizer).

    expert_memory: bytes of routed experts held in memory (or "auto": what is left after
    the rest of the model, a 32K-token KV cache and a 10% margin); the others are read
    from the folder's files as the router picks them (streamed.py); under a group, each
    rank's own budget for the experts it holds.
    """
    if group is not None and group.size() > 1:
        model, config = load_sharded(path, group, mode, tensor, expert_memory=expert_memory)
    else:
        model, config = load_model(path, lazy=lazy, expert_memory=expert_memory)
    path = resolve_path(path)
    problem = tokenizer_problem(path)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    eos = config.get("eos_token_id", (config.get("text_config") or {}).get("eos_token_id"))
    eos = [eos] if isinstance(eos, int) else eos
    tokenizer = load_tokenizer(path, tokenizer_config or {}, eos_token_ids=eos)
    return model, configure_tokenizer(tokenizer, thinking=thinking)


def check_folder(path: Path, expert_memory: Optional[Union[int, str]] = None, *, group=None,
                 mode: str = "tensor", tensor: Optional[int] = None) -> None:
    """What makes a folder unloadable, from its config and file headers alone (checkpoint.check_folder);
    under a group of several ranks, --expert-memory as this rank's part of the model takes it."""
    if group is None or group.size() == 1:
        return checkpoint.check_folder(path, expert_memory)
    checkpoint.check_folder(path)
    if expert_memory is not None:
        check_experts(path, group, mode, tensor, expert_memory=expert_memory)
