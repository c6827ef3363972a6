"""Quantisation policies for conversion: which bits each part of MiniMax-M3 gets, and what it weighs.

A policy maps a module (by its path in this package's model) to a QuantSpec, or to
nothing (kept in the float dtype). `-q` gives a uniform policy; `--recipe NAME` gives a
named mixed one. Recipes are named for the Mac memory they are sized for: 413e9 of the
model's 426e9 text parameters are routed experts, so the experts' bits decide the size
and everything else (attention, index projections, shared expert, dense MLPs,
embeddings, lm_head: ~13e9 parameters) can afford 6 bits. The router (gate weight and
e_score_correction_bias) is never quantised: expert choice flips on small errors.

The vision tower (vision_tower.*, multi_modal_projector.*: ~0.87e9 parameters) is its own
category, kept at 8 bits or above in every policy: 8-bit affine by default (VISION_BITS),
or unquantised in the float dtype (`--vision-bits 16`). Its patch embedding (a 5-D conv
weight) and LayerNorms are never quantised. A text-only conversion (`--drop-vision`, or a
source without vision tensors) simply has no modules in that category.

`estimate_size` computes a converted model's bytes from a config alone (no weights),
module by module as the converter writes them, safetensors headers included, so that
`--list-recipes` can say what the real model weighs before anything is downloaded.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from mlx.utils import tree_flatten

from ..config import ConfigError, ModelArgs
from ..io.dtypes import FLOAT_TAGS, nbytes
from ..model import Model
from ..sizes import ceil_div

CONFIG_DIR = Path(__file__).parent.parent / "configs"
REAL_CONFIG = CONFIG_DIR / "minimax_m3.json"

# mode -> (default group size, default bits), as mlx-lm's convert.
MODE_DEFAULTS = {"affine": (64, 4), "mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}
# What mx.quantize accepts per mode: (bits, group sizes).
MODE_LIMITS = {
    "affine": ((2, 3, 4, 5, 6, 8), (32, 64, 128)),
    "mxfp4": ((4,), (32,)),
    "nvfp4": ((4,), (16,)),
    "mxfp8": ((8,), (32,)),
}

# Module categories, in the order recipes and summaries list them.
CATEGORIES = ("experts", "attention", "index", "shared", "dense", "embed", "lm_head", "router", "vision")
VISION_MODULES = ("vision_tower.", "multi_modal_projector.")  # this package's names
# --vision-bits: 8 = 8-bit affine (the default), 16 = unquantised (the output float dtype).
VISION_BITS = (8, 16)
DEFAULT_VISION_BITS = 8


class PolicyError(ValueError):
    """Quantisation flags that cannot work together (message names the flag)."""


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int
    mode: str = "affine"

    @classmethod
    def make(cls, bits: Optional[int] = None, group_size: Optional[int] = None, mode: str = "affine") -> "QuantSpec":
        """mlx-lm's defaults per mode, then a check that mx.quantize supports the combination."""
        if mode not in MODE_DEFAULTS:
            raise PolicyError(f"--q-mode {mode!r}: choose from {', '.join(MODE_DEFAULTS)}")
        g0, b0 = MODE_DEFAULTS[mode]
        spec = cls(int(bits or b0), int(group_size or g0), mode)
        allowed_bits, allowed_groups = MODE_LIMITS[mode]
        if spec.bits not in allowed_bits:
            raise PolicyError(f"--q-bits {spec.bits} is not available in {mode} mode (allowed: {allowed_bits})")
        if spec.group_size not in allowed_groups:
            raise PolicyError(
                f"--q-group-size {spec.group_size} is not available in {mode} mode (allowed: {allowed_groups})"
            )
        return spec

    def as_config(self) -> dict:
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}

    def fits(self, in_dim: int) -> bool:
        # As mlx-lm: a layer whose input width is not a whole number of groups stays float.
        return in_dim % self.group_size == 0 and (in_dim * self.bits) % 32 == 0

    def packed(self, shape: Tuple[int, ...], float_tag: str) -> List[Tuple[str, Tuple[int, ...], str]]:
        """(suffix, shape, safetensors dtype) of what mx.quantize makes of a weight of `shape`."""
        *lead, n = shape
        out = [("weight", (*lead, n * self.bits // 32), "U32")]
        if self.mode == "affine":  # float scales and biases in the model dtype
            out += [("scales", (*lead, n // self.group_size), float_tag),
                    ("biases", (*lead, n // self.group_size), float_tag)]
        else:  # microscaling formats: one uint8 (E8M0 or E4M3) scale per group, no bias
            out.append(("scales", (*lead, n // self.group_size), "U8"))
        return out

    def label(self) -> str:
        return f"{self.bits}-bit {self.mode} g{self.group_size}" if self.mode == "affine" else self.mode


def category(path: str) -> Optional[str]:
    """The part of the model a module path belongs to (this package's parameter names)."""
    if path.startswith(VISION_MODULES):  # before the text rules: the tower has self_attn and mlp too
        return "vision"
    if path.endswith("embed_tokens"):
        return "embed"
    if path.endswith("lm_head"):
        return "lm_head"
    if ".self_attn.indexer." in path:
        return "index"
    if ".self_attn." in path:
        return "attention"
    if ".mlp.switch_mlp." in path:
        return "experts"
    if ".mlp.shared_experts." in path:
        return "shared"
    if path.endswith(".mlp.gate"):
        return "router"
    if ".mlp." in path:
        return "dense"
    return None


@dataclass(frozen=True)
class Policy:
    """category -> QuantSpec; a category without a spec (always the router) stays float."""

    name: str
    summary: str
    specs: Dict[str, QuantSpec] = field(default_factory=dict)
    mac_gb: Optional[int] = None  # the Mac memory a recipe is named for

    def spec_for(self, path: str, in_dim: int) -> Optional[QuantSpec]:
        cat = category(path)
        if cat is None or cat == "router":
            return None
        spec = self.specs.get(cat)
        if spec is None or not spec.fits(in_dim):
            return None
        return spec

    def with_group_size(self, group_size: Optional[int]) -> "Policy":
        if group_size is None:
            return self
        specs = {c: QuantSpec.make(s.bits, group_size, s.mode) for c, s in self.specs.items()}
        return replace(self, specs=specs)

    def with_vision_bits(self, bits: int) -> "Policy":
        """The same policy with the vision tower at `bits` (8: 8-bit affine; 16: unquantised)."""
        if bits not in VISION_BITS:
            raise PolicyError(f"--vision-bits {bits}: choose 8 (8-bit affine) or 16 (unquantised)")
        specs = {c: s for c, s in self.specs.items() if c != "vision"}
        if bits == 8:
            text = [s for s in specs.values() if s.mode == "affine"]
            specs["vision"] = vision_spec(text[0].group_size if text else None)
        return replace(self, specs=specs)


def vision_spec(group_size: Optional[int] = None) -> QuantSpec:
    """8-bit affine for the vision tower's Linear layers: the text's affine group size, else 64.

    Affine rather than mxfp8 even in an mxfp8/mxfp4/nvfp4 conversion: mxfp8's e4m3 elements
    carry 3 mantissa bits, affine 8-bit 8 bits per group; the tower is too small to matter.
    """
    allowed = MODE_LIMITS["affine"][1]
    return QuantSpec.make(8, group_size if group_size in allowed else MODE_DEFAULTS["affine"][0], "affine")


def uniform_policy(bits: Optional[int], group_size: Optional[int], mode: str) -> Policy:
    """`-q`: one spec for every quantisable module (the router excepted)."""
    spec = QuantSpec.make(bits, group_size, mode)
    specs = {c: spec for c in CATEGORIES if c not in ("router", "vision")}
    specs["vision"] = vision_spec(spec.group_size if mode == "affine" else None)
    return Policy(f"q-{spec.label().replace(' ', '-')}", f"{spec.label()} everywhere", specs)


def _mixed(name: str, expert_bits: int, other_bits: int, mac_gb: int, summary: str) -> Policy:
    specs = {c: QuantSpec.make(other_bits, 64) for c in CATEGORIES if c not in ("router", "vision")}
    specs["experts"] = QuantSpec.make(expert_bits, 64)
    specs["vision"] = vision_spec(64)
    return Policy(name, summary, specs, mac_gb)


RECIPES: Dict[str, Policy] = {
    p.name: p
    for p in (
        _mixed("mac-512gb", 4, 4, 512, "4-bit everywhere (affine g64)"),
        _mixed("mac-256gb", 3, 6, 256, "3-bit experts; 6-bit attention, index, shared expert, dense MLPs, "
                                       "embeddings, lm_head"),
        _mixed("mac-192gb", 2, 6, 192, "2-bit experts; 6-bit attention, index, shared expert, dense MLPs, "
                                       "embeddings, lm_head"),
    )
}


def make_policy(quantize: bool = False, bits: Optional[int] = None, group_size: Optional[int] = None,
                mode: str = "affine", recipe: Optional[str] = None,
                vision_bits: Optional[int] = None) -> Optional[Policy]:
    """The policy the convert flags ask for; None when nothing is quantised (only --dtype applies).

    vision_bits (default DEFAULT_VISION_BITS): the vision tower's Linear layers at 8-bit affine
    (8) or unquantised (16); it only matters when something is quantised.
    """
    if vision_bits is not None and vision_bits not in VISION_BITS:
        raise PolicyError(f"--vision-bits {vision_bits}: choose 8 (8-bit affine) or 16 (unquantised)")
    vision_bits = DEFAULT_VISION_BITS if vision_bits is None else vision_bits
    if recipe is not None:
        if recipe not in RECIPES:
            raise PolicyError(f"--recipe {recipe!r}: unknown; choose from {', '.join(RECIPES)}")
        if bits is not None:
            raise PolicyError("--q-bits: a recipe sets the bits of each part; drop --q-bits or --recipe")
        if mode != "affine":
            raise PolicyError(f"--q-mode {mode}: recipes are affine; drop --q-mode or --recipe")
        return RECIPES[recipe].with_group_size(group_size).with_vision_bits(vision_bits)
    if not quantize:
        if bits is not None or group_size is not None or mode != "affine":
            raise PolicyError("--q-bits/--q-group-size/--q-mode need -q (or --recipe)")
        return None
    return uniform_policy(bits, group_size, mode).with_vision_bits(vision_bits)


# -- sizes -----------------------------------------------------------------------------------------
@dataclass
class SizeEstimate:
    file_bytes: int  # what the output's safetensors files will weigh, headers included
    tensor_bytes: int
    params: int  # logical (unquantised) parameter count
    by_category: Dict[str, Tuple[int, int]]  # category -> (params, bytes)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.tensor_bytes / max(self.params, 1)


def output_tensors(param_shapes: Dict[str, Tuple[int, ...]], quantisable: Iterable[str],
                   policy: Optional[Policy], dtype: str) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """name -> (shape, dtype tag) of every tensor a conversion writes, from the model's parameters."""
    float_tag = FLOAT_TAGS[dtype]
    quantisable = set(quantisable)
    out = {}
    for name, shape in param_shapes.items():
        path, _, leaf = name.rpartition(".")
        spec = policy.spec_for(path, shape[-1]) if (policy and leaf == "weight" and path in quantisable) else None
        if spec is not None:
            for suffix, s, tag in spec.packed(shape, float_tag):
                out[f"{path}.{suffix}"] = (s, tag)
        else:
            out[name] = (shape, keep_float32_tag(name) or float_tag)
    return out


def keep_float32_tag(name: str) -> Optional[str]:
    """The router's score-correction bias stays float32 whatever --dtype says (model.cast_predicate)."""
    return "F32" if name.endswith("e_score_correction_bias") else None


def header_bytes(tensors: Dict[str, Tuple[Tuple[int, ...], str]], n_shards: int = 1) -> int:
    """Bytes of safetensors headers for these tensors (offsets sized as in a file of their total)."""
    total = sum(nbytes(s, t) for s, t in tensors.values())
    digits = len(str(total))
    per_shard = len('{"__metadata__":{"format":"mlx"}}') + 8 + 8  # braces, length prefix, padding
    entries = sum(len(json.dumps({k: {"dtype": t, "shape": list(s), "data_offsets": [0, 0]}},
                                 separators=(",", ":"))) - 2 + 2 * (digits - 1) + 1
                  for k, (s, t) in tensors.items())
    return entries + per_shard * n_shards


def lazy_model(config: dict, vision: bool = False) -> Model:
    """The model built lazily (no parameter memory until evaluated) for shapes and module types;
    with `vision`, its vision tower and projector too (the config must have a vision_config)."""
    args = ModelArgs.from_dict(config)
    if vision and args.vision_config is None:
        raise ConfigError("vision_config: this config describes no vision tower")
    return Model(replace(args, with_vision=bool(vision)))


def has_vision_config(config: dict) -> bool:
    return bool(config.get("vision_config"))


def model_layout(config: dict, vision: bool = False) -> Tuple[Dict[str, Tuple[int, ...]], List[str]]:
    """(parameter name -> shape, quantisable module paths) of the model a config describes:
    the text model, plus the vision tower and projector with `vision`."""
    shapes, quantisable = _model_layout(json.dumps(config, sort_keys=True), bool(vision))
    return dict(shapes), list(quantisable)


@functools.lru_cache(maxsize=8)
def _model_layout(config_json: str, vision: bool):
    model = lazy_model(json.loads(config_json), vision)
    shapes = tuple((k, tuple(v.shape)) for k, v in tree_flatten(model.parameters()))
    predicate = model.quant_predicate
    # Model.quant_predicate takes every Linear; the policy decides the vision layers' bits
    # (category "vision"). The patch embedding is a plain Module and LayerNorms have no
    # to_quantized, so neither is ever listed here.
    quantisable = tuple(p for p, m in model.named_modules() if p and predicate(p, m))
    return shapes, quantisable


def estimate_size(config: dict, policy: Optional[Policy], dtype: Optional[str] = None,
                  shard_bytes: int = 5 << 30, vision: Optional[bool] = None) -> SizeEstimate:
    """Bytes of the converted model `config` describes under `policy` (None: unquantised).

    vision: count the vision tower (default: when the config has a vision_config, as a
    conversion of a release keeps it); False for a text-only conversion.
    """
    dtype = dtype or config_dtype(config)
    vision = has_vision_config(config) if vision is None else bool(vision)
    shapes, quantisable = model_layout(config, vision)
    tensors = output_tensors(shapes, quantisable, policy, dtype)
    tensor_bytes = sum(nbytes(s, t) for s, t in tensors.values())
    n_shards = max(1, ceil_div(tensor_bytes, shard_bytes))
    by_cat: Dict[str, Tuple[int, int]] = {}
    for name, shape in shapes.items():
        cat = category(name.rpartition(".")[0]) or "norms"
        count = 1
        for d in shape:
            count *= d
        p, b = by_cat.get(cat, (0, 0))
        by_cat[cat] = (p + count, b)
    for name, (s, t) in tensors.items():
        cat = category(name.rpartition(".")[0]) or "norms"
        p, b = by_cat[cat]
        by_cat[cat] = (p, b + nbytes(s, t))
    params = sum(p for p, _ in by_cat.values())
    return SizeEstimate(tensor_bytes + header_bytes(tensors, n_shards), tensor_bytes, params, by_cat)


def config_dtype(config: dict) -> str:
    """The float dtype a config declares (torch_dtype / dtype, top level or text_config), else bfloat16."""
    text = config.get("text_config") or {}
    for c in (text, config):
        for key in ("dtype", "torch_dtype"):
            d = str(c.get(key) or "").replace("torch.", "")
            if d in FLOAT_TAGS:
                return d
    return "bfloat16"


def load_config(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def format_recipes(config: dict, dtype: Optional[str] = None, group_size: Optional[int] = None,
                   vision_bits: Optional[int] = None, drop_vision: bool = False) -> str:
    """The --list-recipes table: each recipe's size for the model `config` describes.

    "spare" is what the Mac it is named for keeps for the KV cache (~134 KiB per token of
    context at bf16 for the real model) and macOS; macOS lets the GPU wire about 75% of
    memory by default (raise it with `sudo sysctl iogpu.wired_limit_mb=...`). The sizes
    include the vision tower (from the config's vision_config) unless `drop_vision`.
    """
    dtype = dtype or config_dtype(config)
    vision = has_vision_config(config) and not drop_vision
    vision_bits = DEFAULT_VISION_BITS if vision_bits is None else vision_bits
    rows = [("(none)", estimate_size(config, None, dtype, vision=vision), "-", f"unquantised {dtype}")]
    for name in RECIPES:
        policy = make_policy(recipe=name, group_size=group_size, vision_bits=vision_bits)
        est = estimate_size(config, policy, dtype, vision=vision)
        spare = policy.mac_gb - est.file_bytes / 2**30
        rows.append((name, est, f"{policy.mac_gb} GiB Mac, {spare:.0f} GiB spare", policy.summary))
    lines = [f"{'recipe':<11} {'GB':>7} {'GiB':>7} {'bits/w':>6}  {'fits':<27} what"]
    for name, est, fits, what in rows:
        lines.append(f"{name:<11} {est.file_bytes / 1e9:>7.1f} {est.file_bytes / 2**30:>7.1f} "
                     f"{est.bits_per_weight:>6.2f}  {fits:<27} {what}")
    if vision:
        n, b = rows[1][1].by_category.get("vision", (0, 0))
        how = "8-bit affine" if vision_bits == 8 else f"unquantised {dtype}"
        lines.append(f"All sizes include the vision tower ({n / 1e9:.2f}e9 parameters, {b / 1e9:.2f} GB {how} "
                     f"in each recipe; --vision-bits 8|16 sets its precision, --drop-vision leaves it out).")
    elif has_vision_config(config):
        lines.append("Text only (--drop-vision): the vision tower is left out.")
    return "\n".join(lines)
