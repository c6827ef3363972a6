"""One conversion: options checked, the plan made, written into `.OUT.partial`, then moved into place.

Output goes to `.OUT.partial` beside OUT, renamed only when complete; an existing OUT is
never replaced without --overwrite. The output has mlx-lm's "quantization" config and a
`model_file` that makes `mlx_lm.generate --trust-remote-code` build this package's Model.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import huggingface_hub
import numpy as np

from ..config import ModelArgs
from ..io import CheckpointError
from ..io.dtypes import FLOAT_TAGS
from ..io.reader import weight_files
from ..loading.checkpoint import tokenizer_problem
from ..loading.sharded import inspect_checkpoint
from ..weights.vision_names import VISION_PREFIXES
from . import recipes
from .plan import CHUNK_ELEMENTS, Plan, plan_conversion
from .recipes import Policy, PolicyError, QuantSpec
from .writer import MANIFEST, Manifest, ShardWriter, file_tensors, run_plan

MODEL_FILE = "minimax_m3_model.py"
DEFAULT_SHARD_GB = 5.0  # as mlx-lm
HF_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken", "*.jsonl"]
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)
TOKENIZER_GLOBS = ("*.tiktoken", "*.jinja")

MODEL_FILE_TEXT = '''"""mlx-lm entry point of this converted MiniMax-M3 model (written by `minimax-m3 convert`).

config.json names this file as "model_file", so `mlx_lm.generate --model THIS_FOLDER
--trust-remote-code` (and mlx_lm.load(..., trust_remote_code=True)) builds the model
from the minimax_m3_mlx package rather than mlx-lm's own port.
"""

try:
    from minimax_m3_mlx.config import ModelArgs
    from minimax_m3_mlx.model import Model
except ImportError as e:  # the weights follow minimax_m3_mlx's names and caches
    raise ImportError(
        "this model runs on the minimax_m3_mlx package, which is not on PyPI: install it from its source "
        "folder (the one holding its pyproject.toml) with `pip install -e /path/to/minimax_m3_mlx`, "
        "in the environment that runs mlx-lm"
    ) from e

__all__ = ["Model", "ModelArgs"]
'''


class ConvertError(ValueError):
    """A conversion that cannot go ahead: the message says why and names the file or flag."""



# -- the output folder ----------------------------------------------------------------------------------------------
def output_config(config: dict, plan: Plan) -> dict:
    """The source config for the converted weights: MLX quantization, dtype, our model_file;
    vision_config and projector_hidden_size kept with the tower, dropped without it."""
    cfg = copy.deepcopy(config)
    for c in (cfg, cfg.get("text_config") or {}, cfg.get("vision_config") or {}):
        c.pop("quantization_config", None)  # the source's FP8 description no longer applies
        for key in ("torch_dtype", "dtype"):
            if key in c:
                c[key] = plan.dtype
    cfg.setdefault("torch_dtype", plan.dtype)
    if plan.vision:
        projector = ModelArgs.from_dict(config).projector_hidden_size
        if projector is not None:  # at the top, where the loader reads it whatever the source did
            cfg["projector_hidden_size"] = projector
    else:  # a text-only model: promise no vision tower
        cfg.pop("vision_config", None)
        cfg.pop("projector_hidden_size", None)
    q = quantization_config(plan)
    if q:
        cfg["quantization"] = q
    cfg["model_file"] = MODEL_FILE
    return dict(sorted(cfg.items()))


def quantization_config(plan: Plan) -> Optional[dict]:
    """mlx-lm's "quantization": the commonest spec (by parameters) at the top, the others per module."""
    weights: Dict[QuantSpec, int] = {}
    for p in plan.params.values():
        if p.spec is not None:
            weights[p.spec] = weights.get(p.spec, 0) + int(np.prod(p.shape, dtype=np.int64))
    if not weights:
        return None
    default = max(weights, key=weights.get)
    q = default.as_config()
    for p in plan.params.values():
        if p.spec is not None and p.spec != default:
            q[p.name.rpartition(".")[0]] = p.spec.as_config()
    return q


def write_index(folder: Path, plan: Plan) -> None:
    weight_map = {t.name: plan.shards[t.shard].name for t in plan.files.values()}
    index = {"metadata": {"total_size": plan.tensor_bytes, "total_parameters": plan.n_params},
             "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))


def copy_tokenizer(src: Path, dst: Path) -> List[str]:
    names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    for pattern in TOKENIZER_GLOBS:
        names += [p.name for p in src.glob(pattern) if p.name not in names]
    for n in names:
        shutil.copyfile(src / n, dst / n)
    return names


def resolve_source(hf_path: str, revision: Optional[str] = None, allow_patterns=tuple(HF_ALLOW_PATTERNS)) -> Path:
    """A local folder is read in place; anything else is a Hugging Face repo id to download."""
    p = Path(hf_path).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise ConvertError(f"--hf-path {hf_path}: a file, not a checkpoint folder")
    try:
        return Path(huggingface_hub.snapshot_download(hf_path, revision=revision, allow_patterns=list(allow_patterns)))
    except Exception as e:  # HFValidationError, network and auth errors: all mean "cannot get it"
        raise ConvertError(f"--hf-path {hf_path}: not a local folder, and downloading it failed: {e}") from None


# -- the conversion -------------------------------------------------------------------------------------------------
@dataclass
class ConvertResult:
    path: Path
    file_bytes: int
    tensor_bytes: int
    params: int
    shards: int
    shards_reused: int
    items_run: int
    seconds: float

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.tensor_bytes / max(self.params, 1)


def convert(hf_path: str, mlx_path: str = "mlx_model", quantize: bool = False, q_bits: Optional[int] = None,
            q_group_size: Optional[int] = None, q_mode: str = "affine", dtype: Optional[str] = None,
            recipe: Optional[str] = None, overwrite: bool = False, revision: Optional[str] = None,
            shard_bytes: int = int(DEFAULT_SHARD_GB * (1 << 30)), chunk_elements: int = CHUNK_ELEMENTS,
            progress: bool = True, log=print, vision_bits: Optional[int] = None,
            drop_vision: bool = False, tokenizer: Optional[str] = None) -> ConvertResult:
    """Convert `hf_path` to an MLX model at `mlx_path` (see the module docstring).

    vision_bits: the vision tower's Linear layers when quantising: 8 (8-bit affine, the
    default) or 16 (unquantised, in the output dtype). drop_vision: a text-only model.
    tokenizer: a folder to take the tokenizer files from (default: the source's own).
    """
    t0 = time.time()
    out = Path(mlx_path).expanduser().absolute()
    _refuse_existing(out, overwrite)
    if drop_vision and vision_bits is not None:
        raise ConvertError("--vision-bits: nothing to set with --drop-vision; drop one of them")
    policy = make_policy_or_fail(quantize, q_bits, q_group_size, q_mode, recipe, vision_bits)
    if revision is not None and Path(hf_path).expanduser().is_dir():
        raise ConvertError(f"--revision {revision}: {hf_path} is a local folder; --revision picks a repo revision")
    src = resolve_source(hf_path, revision)
    tokenizer_src = _tokenizer_source(src, tokenizer)
    if out == src.resolve() or src.resolve() in out.parents or out in src.resolve().parents:
        raise ConvertError(f"--mlx-path {out} overlaps the source folder {src}")
    config = read_source_config(src)
    dtype = dtype or recipes.config_dtype(config)
    if dtype not in FLOAT_TAGS:
        raise ConvertError(f"--dtype {dtype}: choose from {', '.join(FLOAT_TAGS)}")
    args = ModelArgs.from_dict(config)
    plan = plan_conversion(src, config, policy, dtype, shard_bytes, chunk_elements, drop_vision)
    _note_source(plan, args, policy, drop_vision, log)

    tmp = out.parent / f".{out.name}.partial"
    tmp.mkdir(parents=True, exist_ok=True)
    with _exclusive(out.parent / f".{out.name}.lock"):
        result = _write(src, out, tmp, config, args, plan, overwrite, progress, log, tokenizer_src)
    result.seconds = time.time() - t0
    log(summary(result, plan))
    return result


def _write(src: Path, out: Path, tmp: Path, config: dict, args: ModelArgs, plan: Plan, overwrite: bool,
           progress: bool, log, tokenizer_src: Optional[Path] = None) -> "ConvertResult":
    """Write (or finish) the partial folder, then move it into place."""
    manifest, done = Manifest.resume(tmp, plan.digest(weight_files(src), config), plan, log)
    if done:
        log(f"resuming: {len(done)} of {len(plan.shards)} shard(s) already written and verified")
    writer = ShardWriter(tmp, plan, manifest, done)
    try:
        items_run, _ = run_plan(plan, args, writer, progress)
    finally:
        writer.close()
    if len(writer.done) != len(plan.shards):
        raise AssertionError(f"shards left unfinished: {sorted(set(range(len(plan.shards))) - writer.done)}")

    write_index(tmp, plan)
    (tmp / "config.json").write_text(json.dumps(output_config(config, plan), indent=4))
    (tmp / MODEL_FILE).write_text(MODEL_FILE_TEXT)
    copy_tokenizer(tokenizer_src or src, tmp)
    (tmp / MANIFEST).unlink()
    _publish(tmp, out, overwrite)
    return ConvertResult(out, sum(s.size for s in plan.shards), plan.tensor_bytes, plan.n_params, len(plan.shards),
                         len(done), items_run, 0.0)


def _tokenizer_source(src: Path, tokenizer: Optional[str]) -> Path:
    """The folder the output's tokenizer comes from; checked now, because an output without
    one converts for an hour and then does not load."""
    folder = Path(tokenizer).expanduser() if tokenizer else src
    if tokenizer and not folder.is_dir():
        raise ConvertError(f"--tokenizer {tokenizer}: not a folder")
    problem = tokenizer_problem(folder)
    if problem:
        if tokenizer:
            raise ConvertError(f"--tokenizer {tokenizer}: {problem}")
        raise ConvertError(f"{src} has {problem}, so the output would not load: pass --tokenizer FOLDER, "
                           f"a folder holding the model's tokenizer")
    return folder


@contextlib.contextmanager
def _exclusive(lock: Path):
    """One conversion per output: a second one would write into the same partial folder."""
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConvertError(f"another conversion is writing {lock.parent / lock.name[1:-5]}") from None
        try:
            yield
        finally:
            lock.unlink()


def make_policy_or_fail(quantize, q_bits, q_group_size, q_mode, recipe, vision_bits=None) -> Optional[Policy]:
    try:
        return recipes.make_policy(quantize, q_bits, q_group_size, q_mode, recipe, vision_bits)
    except PolicyError as e:
        raise ConvertError(str(e)) from None


def _refuse_existing(out: Path, overwrite: bool) -> None:
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise ConvertError(f"--mlx-path {out} already exists: choose another path, or pass --overwrite")


def read_source_config(src: Path) -> dict:
    path = src / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConvertError(f"{src}: no config.json") from None
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path}: not valid JSON ({e})") from None
    if config.get("quantization"):
        raise ConvertError(f"{src}: {_quantized_folder(src)}; quantizing it again would round every weight twice "
                           f"(not exact): convert the release, or load this folder as it is "
                           f"(minimax-m3 server --model {src})")
    return config


def _quantized_folder(src: Path) -> str:
    """What an MLX-quantized source is (its layout and quantization, from its headers)."""
    try:
        return f"already quantized, an {inspect_checkpoint(src).model.checkpoint_layout}"
    except (CheckpointError, ValueError, OSError):
        return "already an MLX-quantized model (it has 'quantization')"


def _note_source(plan: Plan, args: ModelArgs, policy: Optional[Policy], drop_vision: bool, log) -> None:
    vision = sum(1 for k in plan.skipped if k.startswith(VISION_PREFIXES))
    mtp = len(plan.skipped) - vision
    if mtp:
        log(f"skipping {mtp} multi-token-prediction tensor(s) (unused)")
    if vision:
        why = "--drop-vision" if drop_vision else "config.json has no vision_config"
        log(f"leaving out {vision} vision tensor(s) ({why}): the output is a text-only model")
    elif plan.vision:
        n = sum(1 for p in plan.params.values() if recipes.category(p.name.rpartition(".")[0]) == "vision")
        spec = policy.specs.get("vision") if policy else None
        how = spec.label() if spec else f"unquantised {plan.dtype}"
        log(f"keeping the vision tower ({n} tensors; Linear layers {how}; patch embedding and "
            f"LayerNorms {plan.dtype})")
    elif args.vision_config is not None and not drop_vision:
        log("note: the source holds no vision tensors: the output is a text-only model")
    packed = [p for p in plan.params.values() if p.mx_packed]
    if packed and policy is None:
        log(f"note: the source is MXFP8; without -q or --recipe its {len(packed)} packed layer(s) are written "
            f"dequantised in {plan.dtype} (-q --q-mode mxfp8 keeps them packed, bit for bit)")
    unfit = [p.name for p in plan.params.values() if policy and p.spec is None and p.name.endswith(".weight")
             and p.name.rpartition(".")[0] in plan.quantisable
             and policy.specs.get(recipes.category(p.name.rpartition(".")[0])) is not None]
    if unfit:
        log(f"note: {len(unfit)} layer(s) stay in {plan.dtype}: their input width is not a multiple of the "
            f"group size, e.g. {unfit[0]}")


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished folder into place; an old OUT (with --overwrite) goes only afterwards."""
    if out.exists() or out.is_symlink():
        _refuse_existing(out, overwrite)
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
        os.rename(tmp, out)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
    else:
        os.rename(tmp, out)


def summary(r: ConvertResult, plan: Plan) -> str:
    by_cat: Dict[str, List[int]] = {}
    for p in plan.params.values():
        cat = recipes.category(p.name.rpartition(".")[0]) or "norms"
        n = int(np.prod(p.shape, dtype=np.int64))
        b = sum(ft.nbytes for ft in file_tensors(plan, p))
        acc = by_cat.setdefault(cat, [0, 0])
        acc[0] += n
        acc[1] += b
    parts = ", ".join(f"{c} {8 * b / n:.2f}" for c, (n, b) in sorted(by_cat.items(), key=lambda kv: -kv[1][0]))
    reused = f", {r.shards_reused} reused from an interrupted run" if r.shards_reused else ""
    return (f"wrote {r.path}: {human_bytes(r.file_bytes)} in {r.shards} "
            f"shard(s){reused}; {r.params:,} parameters at {r.bits_per_weight:.3f} bits/weight "
            f"({parts}); {r.seconds:.1f} s")


def human_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
