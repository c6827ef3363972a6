"""`minimax-m3 convert`: any released MiniMax-M3 checkpoint -> an MLX model, streamed in bounded memory.

How it works, and why:
- Plan first, from safetensors headers only. Every source tensor is located (file, byte
  offset); the tensors are cut into work items small enough to hold at once: one expert
  (original layout: its w1/w3/w2; transformers re-save: its slice of the fused
  [E, 2I, H] tensors), row blocks of big matrices (embeddings, lm_head, dense MLPs), or
  one small group (a weight with its scale). Each item goes through the same sanitize code the
  loader uses (checkpoint.sanitize_tensors) on placeholder arrays, which gives the name,
  shape and row position of everything the item produces. Checked against the model's
  parameters before a byte is written: missing or extra tensors are errors.
- The output files are laid out from that plan (names, shapes, byte offsets) before any
  weight is read, so every result goes straight to its place in its shard: peak memory is
  one item plus a read-ahead of the next, whatever the model's size. Quantisation works
  row by row (groups run along the last axis), so quantising an expert alone and writing
  it at row e equals quantising the stacked tensor.
- FP8 / MXFP8 sources are dequantised (exactly, in float32) and quantised once to the
  target; an MXFP8 layer whose target is mxfp8 itself is copied packed, never re-rounded.
- Output goes to `.OUT.partial` beside OUT, renamed only when complete. A shard is
  recorded in the manifest (size, sha256) when finished; a rerun with the same plan
  verifies and keeps those and redoes the rest. An existing OUT is never replaced
  without --overwrite.
- The vision tower and projector are kept (their own work items, through the loader's
  vision sanitize: published or transformers names -> ours, FP8/MXFP8 dequantised), and
  config.json keeps vision_config and projector_hidden_size. Their Linear layers are
  8-bit affine by default or unquantised (--vision-bits 16), whatever the recipe gives the
  text; the patch embedding (a 5-D conv weight) and the LayerNorms are never quantised.
  --drop-vision writes a text-only model (no vision tensors, no vision_config), as does a
  source without vision tensors. Multi-token-prediction tensors are always skipped (unused).
- The output has mlx-lm's "quantization" config (per-module entries where a layer's spec
  differs from the commonest, e.g. the 8-bit vision layers) and a `model_file`
  that makes `mlx_lm.generate --trust-remote-code` build this package's Model. mlx-lm
  then insists on trust_remote_code for the folder; `mlx_lm.utils.load_model(path,
  get_model_classes=...)` needs `model_config={"model_file": None}` to take our classes.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import os
import shutil
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from . import recipes
from ..weights.sanitize import (
    DROPPED_PREFIXES, MX_BLOCK, VISION_PREFIXES, CheckpointError, _quant_block, dequantize_fp8_blocks,
    read_safetensors_header, sanitize_tensors, weight_files,
)
from ..config import ConfigError, ModelArgs
from .recipes import Policy, PolicyError, QuantSpec
from ..model.vision import _resolve_fp8 as resolve_vision_fp8, sanitize_vision

MANIFEST = ".convert-manifest.json"
MODEL_FILE = "minimax_m3_model.py"
# Big 2-D tensors (embeddings, lm_head, dense MLPs) are processed in row blocks of at most this
# many elements: counted in elements, not source bytes, because an FP8 block expands to float32
# (and a same-sized scale grid) while it is dequantised. 16M is below one real expert matrix
# (3072 x 6144), which is the unit of work anyway.
CHUNK_ELEMENTS = 16 << 20
DEFAULT_SHARD_GB = 5.0  # as mlx-lm
HF_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken", "*.jsonl"]
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)
TOKENIZER_GLOBS = ("*.tiktoken", "*.jinja")

# safetensors dtype -> (numpy dtype the bytes are read as, MLX dtype of the array). numpy has no
# bfloat16: those bytes are read as uint16 and viewed; float8 stays uint8, as mx.load gives it.
_SOURCE_DTYPES = {
    "F32": (np.float32, mx.float32), "F16": (np.float16, mx.float16), "BF16": (np.uint16, mx.bfloat16),
    "F8_E4M3": (np.uint8, mx.uint8), "U8": (np.uint8, mx.uint8), "I32": (np.int32, mx.int32),
    "U32": (np.uint32, mx.uint32),
}
_MX_TAGS = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32", mx.uint8: "U8"}

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
        "this model runs on the minimax_m3_mlx package: install it (pip install minimax-m3-mlx) "
        "in the environment that runs mlx-lm"
    ) from e

__all__ = ["Model", "ModelArgs"]
'''


class ConvertError(ValueError):
    """A conversion that cannot go ahead: the message says why and names the file or flag."""


# -- the source checkpoint ----------------------------------------------------------------------------
@dataclass(frozen=True)
class SourceTensor:
    name: str
    file: Path
    tag: str  # safetensors dtype
    shape: Tuple[int, ...]
    start: int  # absolute byte offset of the data in `file`
    nbytes: int

    def rows_nbytes(self, rows: Optional[Tuple[int, int]]) -> int:
        if rows is None or not self.shape:
            return self.nbytes
        return (rows[1] - rows[0]) * (self.nbytes // self.shape[0])


def _header_length(path: Path) -> int:
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


def _index_map(folder: Path) -> Optional[Dict[str, str]]:
    index = folder / "model.safetensors.index.json"
    return json.loads(index.read_text())["weight_map"] if index.exists() else None


def scan_source(folder: Path) -> Dict[str, SourceTensor]:
    """Every tensor of a checkpoint folder, located from headers (no weight is read).

    Truncated files, headers that do not add up, index entries pointing at missing files
    or at shards that lack the tensor: errors naming the file.
    """
    weight_map = _index_map(folder)
    tensors: Dict[str, SourceTensor] = {}
    for f in weight_files(folder):
        header = read_safetensors_header(f)
        data_start = 8 + _header_length(f)
        for name, e in header.items():
            if name == "__metadata__":
                continue
            tensors_in_file = _source_tensor(f, name, e, data_start)
            if name in tensors:
                raise CheckpointError(f"{f}: tensor {name} is also in {tensors[name].file.name}")
            tensors[name] = tensors_in_file
        if weight_map is not None:
            absent = sorted(k for k, v in weight_map.items() if v == f.name and k not in header)
            if absent:
                raise CheckpointError(f"{f}: the index places {absent[:5]} in this shard but it lacks them")
    return tensors


def _source_tensor(f: Path, name: str, e: dict, data_start: int) -> SourceTensor:
    tag, shape = e.get("dtype"), tuple(int(d) for d in e.get("shape", ()))
    if tag not in _SOURCE_DTYPES:
        raise CheckpointError(f"{f}: tensor {name} has dtype {tag}, which no MiniMax-M3 layout uses")
    start, end = e["data_offsets"]
    expect = int(np.prod(shape, dtype=np.int64)) * np.dtype(_SOURCE_DTYPES[tag][0]).itemsize
    if end - start != expect:
        raise CheckpointError(f"{f}: tensor {name} spans {end - start} bytes; {tag}{list(shape)} needs {expect}")
    return SourceTensor(name, f, tag, shape, data_start + start, end - start)


class SourceReader:
    """Reads tensors, or row ranges of them, straight from the files (no whole-shard mapping)."""

    def __init__(self):
        self._files = {}

    def read(self, t: SourceTensor, rows: Optional[Tuple[int, int]] = None) -> np.ndarray:
        f = self._files.get(t.file)
        if f is None:
            f = self._files[t.file] = open(t.file, "rb")
        n = t.rows_nbytes(rows)
        offset = t.start + (0 if rows is None else rows[0] * (t.nbytes // t.shape[0]))
        buf = np.empty(n, np.uint8)  # not zero-filled: every byte is read into
        f.seek(offset)
        got = f.readinto(memoryview(buf)) if n else 0
        if got != n:
            raise CheckpointError(f"{t.file}: truncated while reading {t.name} ({got} of {n} bytes)")
        shape = t.shape if rows is None else (rows[1] - rows[0], *t.shape[1:])
        return buf.view(_SOURCE_DTYPES[t.tag][0]).reshape(shape)

    def close(self):
        for f in self._files.values():
            f.close()
        self._files.clear()


def to_mx(t: SourceTensor, data: np.ndarray) -> mx.array:
    a = mx.array(data)
    dtype = _SOURCE_DTYPES[t.tag][1]
    return a if a.dtype == dtype else a.view(dtype)


def placeholder(t: SourceTensor, rows: Optional[Tuple[int, int]]) -> mx.array:
    """A lazy array of the right shape and dtype: planning runs sanitize on these, never evaluated."""
    shape = t.shape if rows is None else (rows[1] - rows[0], *t.shape[1:])
    return mx.zeros(shape, _SOURCE_DTYPES[t.tag][1])


# -- work items -------------------------------------------------------------------------------------------
@dataclass
class WorkItem:
    """Source tensors (or row ranges) that sanitize turns, alone, into rows of output parameters."""

    unit: str
    parts: List[Tuple[SourceTensor, Optional[Tuple[int, int]]]]
    experts: Optional[Tuple[int, ...]] = None  # original layout: the expert this item stacks
    position: Optional[Tuple[int, int]] = None  # rows (axis 0) of every output it fills; None: whole
    vision: bool = False  # vision tower / projector tensors: the loader's vision sanitize applies

    @property
    def nbytes(self) -> int:
        return sum(t.rows_nbytes(r) for t, r in self.parts)


_SCALE_SUFFIXES = (".weight_scale_inv", ".weight_scale")


def _base(name: str) -> str:
    for s in _SCALE_SUFFIXES + (".weight",):
        if name.endswith(s):
            return name[: -len(s)]
    return name


def _unit_of(name: str) -> Tuple[int, str]:
    """(sort key, label): decoder layers in order, then everything else, then the vision tower."""
    for prefix in ("language_model.model.layers.", "model.language_model.layers."):
        if name.startswith(prefix):
            n = int(name[len(prefix):].split(".", 1)[0])
            return n, f"layer {n}"
    if name.startswith(VISION_PREFIXES):
        return (1 << 30) + 1, "vision tower"
    return 1 << 30, "embeddings, final norm, lm_head"


def plan_items(tensors: Dict[str, SourceTensor], args: ModelArgs, chunk_elements: int = CHUNK_ELEMENTS,
               vision: bool = False) -> Tuple[List[WorkItem], List[str]]:
    """(work items in output order, names of tensors deliberately skipped: mtp, and vision
    unless `vision`)."""
    skip = DROPPED_PREFIXES + (() if vision else VISION_PREFIXES)
    skipped = sorted(k for k in tensors if k.startswith(skip))
    groups: Dict[str, List[SourceTensor]] = {}
    for name, t in sorted(tensors.items()):
        if name not in skipped:
            groups.setdefault(_base(name), []).append(t)
    by_unit: Dict[Tuple[int, str], List[WorkItem]] = {}
    experts: Dict[Tuple[Tuple[int, str], int], WorkItem] = {}
    for base, ts in groups.items():
        unit = _unit_of(base)
        items = by_unit.setdefault(unit, [])
        e = _expert_index(base)
        if base.startswith(VISION_PREFIXES):  # a weight (with its scale) or row blocks of it; renames only
            new = _row_items(unit[1], ts, args, chunk_elements)
            for it in new:
                it.vision = True
            items.extend(new)
        elif e is not None:  # original layout: all of one expert's w1/w3/w2 in one item
            item = experts.get((unit, e))
            if item is None:
                item = experts[(unit, e)] = WorkItem(unit[1], [], experts=(e,), position=(e, e + 1))
                items.append(item)
            item.parts += [(t, None) for t in ts]
        elif base.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")):
            items.extend(_fused_expert_items(unit[1], ts, items))
        else:
            items.extend(_row_items(unit[1], ts, args, chunk_elements))
    ordered = []
    for unit in sorted(by_unit):
        ordered += sorted(by_unit[unit], key=lambda it: (it.experts is None, it.experts or (), it.parts[0][0].name,
                                                         it.position or (0, 0)))
    return [it for it in ordered if it.parts], skipped


_EXPERT_MARK = ".block_sparse_moe.experts."


def _expert_index(base: str) -> Optional[int]:
    if _EXPERT_MARK not in base:
        return None
    idx = base.split(_EXPERT_MARK, 1)[1].split(".", 1)[0]
    return int(idx) if idx.isdigit() else None


def _fused_expert_items(unit: str, ts: List[SourceTensor], items: List[WorkItem]) -> List[WorkItem]:
    """transformers re-save: expert e's slice [e:e+1] of gate_up_proj and down_proj, together."""
    (t,) = ts
    layer = t.name.rsplit(".mlp.experts.", 1)[0]
    new = []
    for e in range(t.shape[0]):
        mate = next((it for it in items if it.position == (e, e + 1) and it.experts is None
                     and it.parts[0][0].name.startswith(layer + ".mlp.experts.")), None)
        if mate is None:
            mate = WorkItem(unit, [], position=(e, e + 1))
            new.append(mate)
        mate.parts.append((t, (e, e + 1)))
    return new


def _row_items(unit: str, ts: List[SourceTensor], args: ModelArgs, chunk_elements: int) -> List[WorkItem]:
    """A weight with its scale: whole, or in row blocks when big (and not a fused gate_up)."""
    weight = next((t for t in ts if t.name.endswith(".weight")), None)
    scale = next((t for t in ts if t.name.endswith(_SCALE_SUFFIXES)), None)
    if (weight is None or len(weight.shape) != 2 or weight.shape[0] * weight.shape[1] <= chunk_elements
            or ".gate_up_proj" in weight.name or len(ts) > 2):
        return [WorkItem(unit, [(t, None) for t in ts])]
    block_rows = _quant_block(args)[0] if scale is not None else 1  # FP8 blocks are never cut
    step = max(block_rows, (chunk_elements // weight.shape[1]) // block_rows * block_rows)
    items = []
    for a in range(0, weight.shape[0], step):
        b = min(a + step, weight.shape[0])
        parts = [(weight, (a, b))]
        if scale is not None:
            parts.append((scale, (a // block_rows, -(-b // block_rows))))
        items.append(WorkItem(unit, parts, position=(a, b)))
    return items


def placeholders(item: WorkItem) -> Dict[str, mx.array]:
    return {t.name: placeholder(t, r) for t, r in item.parts}


def transform(args: ModelArgs, item: WorkItem, arrays: Dict[str, mx.array]) -> Dict[str, mx.array]:
    """The loader's own sanitize on this item: our names; MXFP8 stays packed (weight + .scales).

    Vision items go through the loader's vision sanitize instead (FP8 / MXFP8 dequantised there).
    """
    try:
        if item.vision:
            return sanitize_vision(resolve_vision_fp8(args, arrays))
        out, _ = sanitize_tensors(args, arrays, experts=item.experts)
    except CheckpointError as e:
        files = sorted({t.file.name for t, _ in item.parts})
        raise CheckpointError(f"{e} (in {', '.join(files)})") from None
    return out


# -- the output plan ------------------------------------------------------------------------------------------
@dataclass
class Param:
    """One model parameter as the sources produce it, and how it is written."""

    name: str
    shape: Tuple[int, ...]  # logical (dequantised) shape, as in the model
    mx_packed: bool = False  # the source holds it as MXFP8 (weight + .scales)
    spec: Optional[QuantSpec] = None
    chunks: List[Tuple[int, Optional[Tuple[int, int]]]] = field(default_factory=list)  # (item index, rows)

    @property
    def passthrough(self) -> bool:
        """MXFP8 source and mxfp8 target: copy the packed bytes, do not re-round."""
        return self.mx_packed and self.spec == QuantSpec(8, MX_BLOCK, "mxfp8")


@dataclass
class FileTensor:
    name: str
    shape: Tuple[int, ...]
    tag: str
    shard: int = 0
    offset: int = 0  # within the shard's data section

    @property
    def nbytes(self) -> int:
        return recipes.nbytes(self.shape, self.tag)

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else self.nbytes


@dataclass
class Shard:
    name: str
    tensors: List[FileTensor]
    header: bytes = b""

    @property
    def size(self) -> int:
        return 8 + len(self.header) + sum(t.nbytes for t in self.tensors)


@dataclass
class Plan:
    items: List[WorkItem]
    params: Dict[str, Param]  # in output order
    files: Dict[str, FileTensor]  # output tensor name -> placement
    shards: List[Shard]
    skipped: List[str]
    policy: Optional[Policy]
    dtype: str
    vision: bool = False  # the output holds the vision tower
    quantisable: frozenset = frozenset()  # module paths a policy may quantise

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.files.values())

    @property
    def n_params(self) -> int:
        return sum(int(np.prod(p.shape, dtype=np.int64)) for p in self.params.values())

    def digest(self, sources: Sequence[Path], config: dict) -> str:
        """Identifies this conversion: sources (name, size, mtime), config, options and output layout."""
        h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
        for f in sorted(sources):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
        for s in self.shards:
            h.update(s.name.encode() + s.header)
        return h.hexdigest()


def plan_params(items: List[WorkItem], args: ModelArgs, folder: Path) -> Dict[str, Param]:
    """Run every item through sanitize on placeholders: what it makes, and where each piece goes."""
    params: Dict[str, Param] = {}
    for i, item in enumerate(items):
        out = transform(args, item, placeholders(item))
        for name in sorted(out):
            if name.endswith(".scales"):
                continue  # an MXFP8 weight's scale: travels with its weight
            a = out[name]
            packed = name.endswith(".weight") and f"{name[: -len('weight')]}scales" in out
            # uint32 words of four e4m3 bytes: the logical width is four times the packed one
            shape = tuple(a.shape[:-1]) + ((a.shape[-1] * 4,) if packed else tuple(a.shape[-1:]))
            p = params.get(name)
            if p is None:
                p = params[name] = Param(name, shape, packed)
            elif p.mx_packed != packed or p.shape[1:] != shape[1:]:
                src = ", ".join(f"{t.name} ({t.file.name})" for t, _ in item.parts)
                raise CheckpointError(f"{src}: gives {name} a {'packed ' if packed else ''}shape {shape}, other "
                                      f"parts of it have {'packed ' if p.mx_packed else ''}{p.shape}")
            p.chunks.append((i, item.position))
    for p in params.values():
        p.shape = _full_shape(p, folder)
    return params


def _full_shape(p: Param, folder: Path) -> Tuple[int, ...]:
    """The whole tensor's shape from its chunks, after checking they tile it exactly."""
    rows = [r for _, r in p.chunks]
    if rows == [None]:
        return p.shape
    if None in rows:
        raise CheckpointError(f"{folder}: {p.name} is produced both whole and in parts")
    rows.sort()
    at = 0
    for a, b in rows:
        if a != at:
            raise CheckpointError(f"{folder}: {p.name}: rows {at}..{a} (e.g. experts) are missing from the checkpoint")
        at = b
    return (at, *p.shape[1:])


def check_against_model(params: Dict[str, Param], expected: Dict[str, Tuple[int, ...]], folder: Path,
                        items: List[WorkItem]) -> None:
    """Missing, extra or mis-shaped tensors, named, before anything is written."""
    missing = [k for k in expected if k not in params]
    if missing:
        raise CheckpointError(
            f"{folder}: the checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:5]}")
    for k, p in params.items():
        if k not in expected:
            i = p.chunks[0][0]
            src = ", ".join(sorted({f"{t.name} ({t.file.name})" for t, _ in items[i].parts}))
            raise CheckpointError(f"{folder}: {k} (from {src}) is not a parameter of the model")
        if tuple(expected[k]) != p.shape:
            raise CheckpointError(f"{folder}: {k} has shape {p.shape} in the checkpoint, the model expects "
                                  f"{tuple(expected[k])}")


def keeps_vision(tensors: Dict[str, SourceTensor], args: ModelArgs, drop_vision: bool = False) -> bool:
    """The output holds the vision tower: asked for, described by the config, present in the source."""
    return (not drop_vision and args.vision_config is not None
            and any(k.startswith(VISION_PREFIXES) for k in tensors))


def plan_conversion(folder: Path, config: dict, policy: Optional[Policy], dtype: str,
                    shard_bytes: int, chunk_elements: int = CHUNK_ELEMENTS, drop_vision: bool = False) -> Plan:
    """The whole output from the source's headers. The vision tower is planned (and checked
    tensor by tensor against the model's, via build_vision) when keeps_vision says so."""
    args = ModelArgs.from_dict(config)
    tensors = scan_source(folder)
    vision = keeps_vision(tensors, args, drop_vision)
    items, skipped = plan_items(tensors, args, chunk_elements, vision)
    params = plan_params(items, _float32_args(args), folder)
    shapes, quantisable = recipes.model_layout(config, vision)
    check_against_model(params, shapes, folder, items)
    params = {k: params[k] for k in sorted(params, key=lambda k: min(i for i, _ in params[k].chunks))}
    quantisable = set(quantisable)
    for p in params.values():
        path, _, leaf = p.name.rpartition(".")
        if policy is not None and leaf == "weight" and path in quantisable:
            p.spec = policy.spec_for(path, p.shape[-1])
    files = {}
    for p in params.values():
        planned = recipes.output_tensors({p.name: p.shape}, [p.name.rpartition(".")[0]] if p.spec else [],
                                         policy, dtype)
        for name, (shape, tag) in planned.items():
            files[name] = FileTensor(name, shape, tag)
    shards = layout_shards(list(files.values()), shard_bytes)
    return Plan(items, params, files, shards, skipped, policy, dtype, vision, frozenset(quantisable))


def _float32_args(args: ModelArgs) -> ModelArgs:
    # FP8 blocks dequantise in float32 (exact), cast once to the output dtype afterwards.
    return replace(args, dtype="float32")


def layout_shards(tensors: List[FileTensor], shard_bytes: int) -> List[Shard]:
    """Fill shards in order up to shard_bytes (a bigger tensor gets a shard of its own), as mlx-lm."""
    groups: List[List[FileTensor]] = []
    size = 0
    for t in tensors:
        if not groups or (size + t.nbytes > shard_bytes and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    n = len(groups)
    shards = []
    for i, group in enumerate(groups):
        name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        offset = 0
        for t in group:
            t.shard, t.offset = i, offset
            offset += t.nbytes
        shards.append(Shard(name, group, _header(group)))
    return shards


def _header(tensors: List[FileTensor]) -> bytes:
    entries = {"__metadata__": {"format": "mlx"}}
    for t in tensors:
        entries[t.name] = {"dtype": t.tag, "shape": list(t.shape), "data_offsets": [t.offset, t.offset + t.nbytes]}
    raw = json.dumps(entries, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes


# -- encoding one chunk --------------------------------------------------------------------------------------
def encode(p: Param, out: Dict[str, mx.array], dtype) -> Dict[str, mx.array]:
    """Output tensors (file names -> this chunk's rows) for parameter p from an item's sanitize output."""
    path = p.name.rpartition(".")[0]
    w = out[p.name]
    if p.passthrough:
        return {f"{path}.weight": w, f"{path}.scales": out[f"{path}.scales"]}
    if p.mx_packed:  # MXFP8 bytes + E8M0 scales -> exact float32
        w = dequantize_fp8_blocks(w.view(mx.uint8), out[f"{path}.scales"], (1, MX_BLOCK), p.name, mx.float32)
    keep = recipes.keep_float32_tag(p.name)
    if p.spec is None:
        return {p.name: w.astype(mx.float32 if keep else dtype)}
    # Cast first, as mlx-lm does: affine scales and biases come out in the model dtype.
    parts = mx.quantize(w.astype(dtype), group_size=p.spec.group_size, bits=p.spec.bits, mode=p.spec.mode)
    names = ["weight", "scales", "biases"][: len(parts)]
    return {f"{path}.{n}": a for n, a in zip(names, parts)}


def _bytes(a: mx.array) -> memoryview:
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return memoryview(np.ascontiguousarray(np.asarray(a))).cast("B")


# -- writing shards ---------------------------------------------------------------------------------------------
class ShardWriter:
    """Shard files laid out in advance; chunks land at their offsets; finished shards are hashed."""

    def __init__(self, folder: Path, plan: Plan, manifest: "Manifest", done: set):
        self.folder, self.plan, self.manifest = folder, plan, manifest
        self.done = set(done)
        self.pending = {i: 0 for i in range(len(plan.shards)) if i not in self.done}
        self.handles = {}

    def expect(self, tensor: FileTensor):
        if tensor.shard in self.pending:
            self.pending[tensor.shard] += 1

    def write(self, tensor: FileTensor, rows: Optional[Tuple[int, int]], data: mx.array) -> None:
        if tensor.shard in self.done:
            return
        expect = tensor.shape if rows is None else (rows[1] - rows[0], *tensor.shape[1:])
        if tuple(data.shape) != tuple(expect) or _MX_TAGS.get(data.dtype) != tensor.tag:
            raise AssertionError(f"{tensor.name}: produced {data.dtype}{tuple(data.shape)}, planned "
                                 f"{tensor.tag}{tuple(expect)}")
        shard = self.plan.shards[tensor.shard]
        f = self._open(tensor.shard)
        f.seek(8 + len(shard.header) + tensor.offset + (rows[0] * tensor.row_bytes if rows else 0))
        f.write(_bytes(data))
        self.pending[tensor.shard] -= 1
        if self.pending[tensor.shard] == 0:
            self._finish(tensor.shard)

    def _open(self, i: int):
        f = self.handles.get(i)
        if f is None:
            shard = self.plan.shards[i]
            path = self.folder / shard.name
            f = self.handles[i] = open(path, "w+b")
            f.write(struct.pack("<Q", len(shard.header)) + shard.header)
            f.truncate(shard.size)
        return f

    def _finish(self, i: int) -> None:
        f = self.handles.pop(i)
        f.flush()
        os.fsync(f.fileno())
        f.close()
        finish_shard(self.folder, self.plan.shards[i], self.manifest)
        self.done.add(i)
        del self.pending[i]

    def close(self):
        for f in self.handles.values():
            f.close()
        self.handles.clear()


def finish_shard(folder: Path, shard: Shard, manifest: "Manifest") -> None:
    """Record a completed shard (size, sha256): a rerun keeps it after checking both."""
    path = folder / shard.name
    size = path.stat().st_size
    if size != shard.size:
        raise AssertionError(f"{path}: {size} bytes written, {shard.size} planned")
    manifest.record(shard.name, size, sha256_file(path))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


class Manifest:
    """`.convert-manifest.json` in the partial folder: the plan digest and the finished shards."""

    def __init__(self, folder: Path, digest: str):
        self.path = folder / MANIFEST
        self.digest = digest
        self.shards: Dict[str, dict] = {}

    @classmethod
    def resume(cls, folder: Path, digest: str, plan: Plan, log) -> Tuple["Manifest", set]:
        """The finished shards a previous run of the same plan left, each re-verified."""
        m = cls(folder, digest)
        try:
            old = json.loads(m.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            old = {}
        if old and old.get("plan") != digest:
            log(f"{folder} holds a different conversion (other source or options): starting over")
            old = {}
        keep = {s.name for s in plan.shards} if old else set()
        for f in folder.iterdir():  # nothing from another run may end up in the output
            if f.name in keep or f.name == MANIFEST:
                continue
            if f.is_dir() and not f.is_symlink():
                shutil.rmtree(f)
            else:
                f.unlink()
        done = set()
        for i, shard in enumerate(plan.shards):
            rec = old.get("shards", {}).get(shard.name)
            path = folder / shard.name
            if rec is None or not path.exists():
                continue
            if path.stat().st_size == rec["size"] == shard.size and sha256_file(path) == rec["sha256"]:
                m.shards[shard.name] = rec
                done.add(i)
            else:
                log(f"{shard.name}: size or sha256 differs from the manifest: rewriting it")
        m.save()
        return m, done

    def record(self, name: str, size: int, sha: str) -> None:
        self.shards[name] = {"size": size, "sha256": sha}
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"plan": self.digest, "shards": self.shards}, indent=1))
        os.replace(tmp, self.path)


# -- running the plan -----------------------------------------------------------------------------------------------
def run_plan(plan: Plan, args: ModelArgs, writer: ShardWriter, progress: bool) -> Tuple[int, int]:
    """Process the items whose outputs are not all in finished shards; returns (items run, bytes read)."""
    outputs: Dict[int, List[Param]] = {}
    for p in plan.params.values():
        for i, rows in p.chunks:
            outputs.setdefault(i, []).append(p)
            for ft in _file_tensors(plan, p):
                writer.expect(ft)
    todo = [i for i in range(len(plan.items))
            if any(ft.shard not in writer.done for p in outputs.get(i, []) for ft in _file_tensors(plan, p))]
    total = sum(plan.items[i].nbytes for i in todo)
    dtype = getattr(mx, plan.dtype)
    f32_args = _float32_args(args)
    bar = _progress(total, progress)
    reader = SourceReader()
    chunks = _read_ahead(plan.items, todo, reader)
    unit = None
    try:
        for i, raw in chunks:
            item = plan.items[i]
            arrays = {t.name: to_mx(t, data) for (t, _), data in zip(item.parts, raw)}
            out = transform(f32_args, item, arrays)
            for p in outputs.get(i, []):
                rows = next(r for j, r in p.chunks if j == i)
                encoded = encode(p, out, dtype)
                mx.eval(list(encoded.values()))
                for name, a in encoded.items():
                    writer.write(plan.files[name], rows, a)
            del raw, arrays, out
            if item.unit != unit:  # a new layer: its buffer sizes differ, so let MLX's cache go
                unit = item.unit
                mx.clear_cache()
                bar.set_postfix_str(unit, refresh=False)
            bar.update(item.nbytes)
    finally:
        chunks.close()  # waits for a read in flight before the files close
        bar.close()
        reader.close()
    return len(todo), total


def _file_tensors(plan: Plan, p: Param) -> List[FileTensor]:
    path = p.name.rpartition(".")[0]
    if p.spec is None:
        return [plan.files[p.name]]
    return [plan.files[n] for n in (f"{path}.weight", f"{path}.scales", f"{path}.biases") if n in plan.files]


def _read_ahead(items: List[WorkItem], todo: List[int], reader: SourceReader) -> Iterator[Tuple[int, list]]:
    """Yield (index, source arrays) with the next item's reads already running (I/O overlaps compute)."""
    def read(i):
        return [reader.read(t, r) for t, r in items[i].parts]

    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(read, todo[0]) if todo else None
        for k, i in enumerate(todo):
            raw = future.result()
            future = pool.submit(read, todo[k + 1]) if k + 1 < len(todo) else None
            yield i, raw


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="convert",
                disable=not enabled, smoothing=0.05, file=sys.stderr)


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
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(hf_path, revision=revision, allow_patterns=list(allow_patterns)))
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
            drop_vision: bool = False) -> ConvertResult:
    """Convert `hf_path` to an MLX model at `mlx_path` (see the module docstring).

    vision_bits: the vision tower's Linear layers when quantising: 8 (8-bit affine, the
    default) or 16 (unquantised, in the output dtype). drop_vision: a text-only model.
    """
    t0 = time.time()
    out = Path(mlx_path).expanduser().absolute()
    _refuse_existing(out, overwrite)
    if drop_vision and vision_bits is not None:
        raise ConvertError("--vision-bits: nothing to set with --drop-vision; drop one of them")
    policy = make_policy_or_fail(quantize, q_bits, q_group_size, q_mode, recipe, vision_bits)
    src = resolve_source(hf_path, revision)
    if out == src.resolve() or src.resolve() in out.parents or out in src.resolve().parents:
        raise ConvertError(f"--mlx-path {out} overlaps the source folder {src}")
    config = _read_config(src)
    dtype = dtype or recipes.config_dtype(config)
    if dtype not in recipes.DTYPE_TAGS:
        raise ConvertError(f"--dtype {dtype}: choose from {', '.join(recipes.DTYPE_TAGS)}")
    args = ModelArgs.from_dict(config)
    plan = plan_conversion(src, config, policy, dtype, shard_bytes, chunk_elements, drop_vision)
    _note_source(plan, args, policy, drop_vision, log)

    tmp = out.parent / f".{out.name}.partial"
    tmp.mkdir(parents=True, exist_ok=True)
    with _exclusive(out.parent / f".{out.name}.lock"):
        result = _write(src, out, tmp, config, args, plan, overwrite, progress, log)
    result.seconds = time.time() - t0
    log(summary(result, plan))
    return result


def _write(src: Path, out: Path, tmp: Path, config: dict, args: ModelArgs, plan: Plan, overwrite: bool,
           progress: bool, log) -> "ConvertResult":
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
    copy_tokenizer(src, tmp)
    (tmp / MANIFEST).unlink()
    _publish(tmp, out, overwrite)
    return ConvertResult(out, sum(s.size for s in plan.shards), plan.tensor_bytes, plan.n_params, len(plan.shards),
                         len(done), items_run, 0.0)


@contextlib.contextmanager
def _exclusive(lock: Path):
    """One conversion per output: a second one would write into the same partial folder."""
    import fcntl

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


def _read_config(src: Path) -> dict:
    path = src / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConvertError(f"{src}: no config.json") from None
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path}: not valid JSON ({e})") from None
    if config.get("quantization"):
        raise ConvertError(f"{path}: already an MLX-converted model (it has 'quantization'); convert the release")
    return config


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
        b = sum(ft.nbytes for ft in _file_tensors(plan, p))
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


# -- command line -------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="minimax-m3 convert",
        description="Convert a released MiniMax-M3 checkpoint (BF16, transformers re-save, MXFP8, FP8) to MLX, "
                    "streaming one expert or row block at a time.")
    p.add_argument("--hf-path", "--model", help="checkpoint folder, or a Hugging Face repo id to download")
    p.add_argument("--mlx-path", default="mlx_model", help="output folder (default: mlx_model)")
    p.add_argument("-q", "--quantize", action="store_true",
                   help="quantise every layer but the router (the vision tower: see --vision-bits)")
    p.add_argument("--q-bits", type=int, default=None, help="bits per weight (default: 4, mxfp8: 8)")
    p.add_argument("--q-group-size", type=int, default=None,
                   help="group size (default: affine 64, mxfp4/mxfp8 32, nvfp4 16); also applies to --recipe")
    p.add_argument("--q-mode", default="affine", choices=list(recipes.MODE_DEFAULTS), help="quantisation mode")
    p.add_argument("--dtype", default=None, choices=list(recipes.DTYPE_TAGS),
                   help="dtype of unquantised tensors and affine scales (default: the config's)")
    p.add_argument("--recipe", default=None, choices=list(recipes.RECIPES), help="mixed-precision recipe")
    p.add_argument("--vision-bits", type=int, default=None, choices=list(recipes.VISION_BITS),
                   help="the vision tower's Linear layers when quantising: 8 = 8-bit affine (default), "
                        "16 = unquantised in --dtype; its patch embedding and LayerNorms are never quantised")
    p.add_argument("--drop-vision", action="store_true",
                   help="leave the vision tower out: a text-only model (no vision_config in its config)")
    p.add_argument("--list-recipes", action="store_true",
                   help="print each recipe's size for the real model (or for --hf-path's config) and exit")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --mlx-path")
    p.add_argument("--revision", default=None, help="repo revision to download")
    p.add_argument("--shard-size-gb", type=float, default=DEFAULT_SHARD_GB, help="output shard size (GiB)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    opts = build_parser().parse_args(argv)
    try:
        if opts.list_recipes:
            print(list_recipes(opts.hf_path, opts.dtype, opts.q_group_size, opts.vision_bits, opts.drop_vision))
            return 0
        if not opts.hf_path:
            raise ConvertError("--hf-path is required")
        convert(opts.hf_path, opts.mlx_path, quantize=opts.quantize, q_bits=opts.q_bits,
                q_group_size=opts.q_group_size, q_mode=opts.q_mode, dtype=opts.dtype, recipe=opts.recipe,
                overwrite=opts.overwrite, revision=opts.revision,
                shard_bytes=int(opts.shard_size_gb * (1 << 30)), progress=not opts.no_progress,
                vision_bits=opts.vision_bits, drop_vision=opts.drop_vision)
    except (ConvertError, CheckpointError, ConfigError, PolicyError) as e:
        print(f"minimax-m3 convert: error: {e}", file=sys.stderr)
        return 1
    return 0


def list_recipes(hf_path: Optional[str], dtype: Optional[str], group_size: Optional[int],
                 vision_bits: Optional[int] = None, drop_vision: bool = False) -> str:
    if hf_path:  # a repo id: its config.json alone is enough
        config = _read_config(resolve_source(hf_path, allow_patterns=["config.json"]))
        what = f"the model at {hf_path}"
    else:
        config = recipes.load_config(recipes.REAL_CONFIG)
        what = "MiniMax-M3 (428B; configs/minimax_m3.json)"
    try:
        table = recipes.format_recipes(config, dtype, group_size, vision_bits, drop_vision)
    except PolicyError as e:
        raise ConvertError(str(e)) from None
    return f"Recipes, sized for {what}:\n" + table


if __name__ == "__main__":
    sys.exit(main())
