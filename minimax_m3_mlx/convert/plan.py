"""The conversion plan, from the source's headers alone: work items, output tensors, shards.

Every source tensor is located (io.reader.locate) and cut into work items small enough
to hold at once: one expert (original layout: its w1/w3/w2; transformers re-save: its
slice of the fused [E, 2I, H] tensors), row blocks of big matrices (embeddings, lm_head,
dense MLPs), or one small group (a weight with its scale). Each item goes through the
loader's own sanitize (weights/sanitize.py) on placeholder arrays, which gives the name,
shape and row position of everything it produces; that is checked against the model's
parameters, and the output files are laid out (names, shapes, byte offsets) before any
weight is read.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from ..config import ModelArgs
from ..io import CheckpointError
from ..io.dtypes import nbytes
from ..io.reader import StoredTensor, locate, placeholder
from ..io.writer import encode_header
from ..sizes import ceil_div
from ..weights.quant import MX_BLOCK, SCALE_SUFFIXES, quant_block
from ..weights.sanitize import DROPPED_PREFIXES, sanitize_tensors, vision_tensors
from ..weights.vision_names import VISION_PREFIXES
from . import recipes
from .recipes import Policy, QuantSpec

# Big 2-D tensors (embeddings, lm_head, dense MLPs) are processed in row blocks of at most this
# many elements: counted in elements, not source bytes, because an FP8 block expands to float32
# (and a same-sized scale grid) while it is dequantised. 16M is below one real expert matrix
# (3072 x 6144), which is the unit of work anyway.
CHUNK_ELEMENTS = 16 << 20


# -- work items -------------------------------------------------------------------------------------------
@dataclass
class WorkItem:
    """Source tensors (or row ranges) that sanitize turns, alone, into rows of output parameters."""

    unit: str
    parts: List[Tuple[StoredTensor, Optional[Tuple[int, int]]]]
    experts: Optional[Tuple[int, ...]] = None  # original layout: the expert this item stacks
    position: Optional[Tuple[int, int]] = None  # rows (axis 0) of every output it fills; None: whole
    vision: bool = False  # vision tower / projector tensors: the loader's vision sanitize applies

    @property
    def nbytes(self) -> int:
        return sum(t.rows_nbytes(r) for t, r in self.parts)




def _base(name: str) -> str:
    for s in SCALE_SUFFIXES + (".weight",):
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


def plan_items(tensors: Dict[str, StoredTensor], args: ModelArgs, chunk_elements: int = CHUNK_ELEMENTS,
               vision: bool = False) -> Tuple[List[WorkItem], List[str]]:
    """(work items in output order, names of tensors deliberately skipped: mtp, and vision
    unless `vision`)."""
    skip = DROPPED_PREFIXES + (() if vision else VISION_PREFIXES)
    skipped = sorted(k for k in tensors if k.startswith(skip))
    groups: Dict[str, List[StoredTensor]] = {}
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


def _fused_expert_items(unit: str, ts: List[StoredTensor], items: List[WorkItem]) -> List[WorkItem]:
    """transformers re-save: expert e's slice [e:e+1] of gate_up_proj and down_proj, together."""
    (t,) = ts
    layer = t.name.rsplit(".mlp.experts.", 1)[0]
    new = []
    for e in range(t.shape[0]):
        expert_item = next((it for it in items if it.position == (e, e + 1) and it.experts is None
                     and it.parts[0][0].name.startswith(layer + ".mlp.experts.")), None)
        if expert_item is None:
            expert_item = WorkItem(unit, [], position=(e, e + 1))
            new.append(expert_item)
        expert_item.parts.append((t, (e, e + 1)))
    return new


def _row_items(unit: str, ts: List[StoredTensor], args: ModelArgs, chunk_elements: int) -> List[WorkItem]:
    """A weight with its scale: whole, or in row blocks when big (and not a fused gate_up)."""
    weight = next((t for t in ts if t.name.endswith(".weight")), None)
    scale = next((t for t in ts if t.name.endswith(SCALE_SUFFIXES)), None)
    if (weight is None or len(weight.shape) != 2 or weight.shape[0] * weight.shape[1] <= chunk_elements
            or ".gate_up_proj" in weight.name or len(ts) > 2):
        return [WorkItem(unit, [(t, None) for t in ts])]
    block_rows = quant_block(args.quantization_config)[0] if scale is not None else 1  # FP8 blocks are never cut
    step = max(block_rows, (chunk_elements // weight.shape[1]) // block_rows * block_rows)
    items = []
    for a in range(0, weight.shape[0], step):
        b = min(a + step, weight.shape[0])
        parts = [(weight, (a, b))]
        if scale is not None:
            parts.append((scale, (a // block_rows, ceil_div(b, block_rows))))
        items.append(WorkItem(unit, parts, position=(a, b)))
    return items


def placeholders(item: WorkItem) -> Dict[str, mx.array]:
    return {t.name: placeholder(t, r) for t, r in item.parts}


def transform(args: ModelArgs, item: WorkItem, arrays: Dict[str, mx.array]) -> Dict[str, mx.array]:
    """The loader's own sanitize on this item: our names; MXFP8 stays packed (weight + .scales).

    Vision items go through the loader's vision mapping instead (FP8 / MXFP8 dequantised there).
    """
    try:
        if item.vision:
            return vision_tensors(args, arrays)
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
        return nbytes(self.shape, self.tag)

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


def keeps_vision(tensors: Dict[str, StoredTensor], args: ModelArgs, drop_vision: bool = False) -> bool:
    """The output holds the vision tower: asked for, described by the config, present in the source."""
    return (not drop_vision and args.vision_config is not None
            and any(k.startswith(VISION_PREFIXES) for k in tensors))


def plan_conversion(folder: Path, config: dict, policy: Optional[Policy], dtype: str,
                    shard_bytes: int, chunk_elements: int = CHUNK_ELEMENTS, drop_vision: bool = False) -> Plan:
    """The whole output from the source's headers. The vision tower is planned (and checked
    tensor by tensor against the model's, which has the tower then) when keeps_vision says so."""
    args = ModelArgs.from_dict(config)
    tensors = locate(folder)
    vision = keeps_vision(tensors, args, drop_vision)
    items, skipped = plan_items(tensors, args, chunk_elements, vision)
    params = plan_params(items, float32_args(args), folder)
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


def float32_args(args: ModelArgs) -> ModelArgs:
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
    return encode_header(((t.name, t.tag, t.shape, t.offset, t.offset + t.nbytes) for t in tensors),
                         metadata={"format": "mlx"})
