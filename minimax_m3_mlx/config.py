"""ModelArgs: the MiniMax-M3 text model's configuration, read from any published spelling.

The published config.json nests the text model under `text_config` and spells the
per-layer and sparse-attention keys the original way (`moe_layer_freq`,
`sparse_attention_config`); transformers 5.x re-saves spell them flat
(`mlp_layer_types`, `layer_types`, `index_*`). Both resolve to the same fields here, and
a config that contradicts itself is refused with an error naming the key, because a
silently mis-read config gives a model that runs and is wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

SPARSE_ATTENTION = "minimax_m3_sparse"
FULL_ATTENTION = "full_attention"

# original (nested under sparse_attention_config) -> flat (transformers 5.x)
_SPARSE_KEYS = {
    "sparse_num_index_heads": "index_n_heads",
    "sparse_index_dim": "index_head_dim",
    "sparse_block_size": "index_block_size",
    "sparse_topk_blocks": "index_topk_blocks",
    "sparse_local_block": "index_local_blocks",
}


class ConfigError(ValueError):
    """A config.json that cannot describe a MiniMax-M3 model."""


# Keys without which a config does not say which model it is: the defaults below are the
# real model's sizes, and a config that silently took them would fail later on tensor shapes.
REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
REQUIRED_MOE = ("intermediate_size", "num_local_experts", "num_experts_per_tok", "shared_intermediate_size")
REQUIRED_DENSE = ("dense_intermediate_size",)
REQUIRED_SPARSE = ("index_n_heads", "index_head_dim", "index_block_size", "index_topk_blocks")
INT_KEYS = REQUIRED + REQUIRED_MOE + REQUIRED_DENSE + REQUIRED_SPARSE + (
    "head_dim", "max_position_embeddings", "rotary_dim", "index_local_blocks", "projector_hidden_size",
    "image_token_index", "video_token_index")
FLOAT_KEYS = ("rms_norm_eps", "rope_theta", "routed_scaling_factor", "swiglu_alpha", "swiglu_limit",
              "partial_rotary_factor")
OBJECT_KEYS = ("text_config", "sparse_attention_config", "rope_parameters", "rope_scaling", "vision_config",
               "quantization", "quantization_config")


def _check_types(c: Dict[str, Any], where: str = "") -> None:
    for key in INT_KEYS:
        v = c.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
            raise ConfigError(f"{where}{key}: must be an integer, got {v!r}")
    for key in FLOAT_KEYS:
        v = c.get(key)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)):
            raise ConfigError(f"{where}{key}: must be a number, got {v!r}")
    for key in OBJECT_KEYS:
        v = c.get(key)
        if v is not None and not isinstance(v, dict):
            raise ConfigError(f"{where}{key}: must be an object, got {v!r}")
    if "tie_word_embeddings" in c and not isinstance(c["tie_word_embeddings"], bool):
        raise ConfigError(f"{where}tie_word_embeddings: must be true or false, got {c['tie_word_embeddings']!r}")


def _require(c: Dict[str, Any], keys, why: str = "") -> None:
    legacy = {flat: f"{flat} (or sparse_attention_config.{old})" for old, flat in _SPARSE_KEYS.items()}
    missing = [legacy.get(k, k) for k in keys if c.get(k) is None]
    if missing:
        raise ConfigError(f"{missing[0]}: required{why}, and config.json has none (neither in text_config nor at "
                          f"the top level)" + (f"; also missing: {', '.join(missing[1:])}" if missing[1:] else ""))


@dataclass
class ModelArgs:
    model_type: str = "minimax_m3_vl"
    vocab_size: int = 200064
    hidden_size: int = 6144
    num_hidden_layers: int = 60
    num_attention_heads: int = 64
    num_key_value_heads: int = 4
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 1048576
    rope_theta: float = 5e6
    rotary_dim: int = 64
    rope_scaling: Optional[Dict[str, Any]] = None
    # MLPs
    intermediate_size: int = 3072
    dense_intermediate_size: int = 12288
    shared_intermediate_size: int = 3072
    num_local_experts: int = 128
    num_experts_per_tok: int = 4
    routed_scaling_factor: float = 2.0
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    mlp_layer_types: List[str] = field(default_factory=list)
    # attention
    layer_types: List[str] = field(default_factory=list)
    index_n_heads: int = 4
    index_head_dim: int = 128
    index_block_size: int = 128
    index_topk_blocks: int = 16
    index_local_blocks: int = 1
    tie_word_embeddings: bool = False
    # Runtime: dtype of the cached index keys. Both score float32 products, exactly as the
    # reference (which computes the keys in the model dtype and upcasts them to score):
    # "model" stores them in the model dtype (half the bytes; each step upcasts what it
    # reads), "float32" stores them upcast (2x the bytes, no upcast per step). With
    # --kv-bits they are quantized instead (--index-bits). README: what each costs.
    index_cache_dtype: str = "model"
    # checkpoint-level
    dtype: str = "bfloat16"
    quantization: Optional[Dict[str, Any]] = None  # MLX's own (converted models)
    quantization_config: Optional[Dict[str, Any]] = None  # the source's (fp8, mxfp8)
    vision_config: Optional[Dict[str, Any]] = None
    # Set by the loader, not read from config.json: False when the checkpoint holds no vision
    # weights (a text-only source with a vision_config), so Model builds no tower. None: the
    # config decides (a converted folder keeps vision_config only with the tower).
    with_vision: Optional[bool] = None
    projector_hidden_size: Optional[int] = None  # top level; None: the reference's default (6144)
    image_token_index: int = 200025
    video_token_index: int = 200026
    bos_token_id: Optional[int] = 200034
    eos_token_id: Any = 200020

    @classmethod
    def from_dict(cls, config: Dict[str, Any]) -> "ModelArgs":
        """Build from a whole config.json (top level and `text_config` merged)."""
        if not isinstance(config, dict):
            raise ConfigError(f"config must be a JSON object, got {type(config).__name__}")
        _check_types(config)
        text = dict(config.get("text_config") or {})
        _check_types(text, "text_config.")
        top = {k: v for k, v in config.items() if k != "text_config"}
        # Text keys live in text_config in the published config; a flat config (or an
        # mlx-lm style one) has them at the top. text_config wins where both exist.
        merged = {**top, **text}
        for key in ("quantization", "quantization_config", "vision_config",
                    "image_token_index", "video_token_index", "model_type"):
            if key in top:
                merged[key] = top[key]
        return cls._resolve(merged)

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelArgs":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            config = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(config)

    @classmethod
    def _resolve(cls, c: Dict[str, Any]) -> "ModelArgs":
        known = cls.__dataclass_fields__
        kw = {k: v for k, v in c.items() if k in known and k != "with_vision"}

        # Sparse attention: nested original spelling, or flat transformers spelling.
        sparse_cfg = c.get("sparse_attention_config") or {}
        for legacy in _SPARSE_KEYS:
            v = sparse_cfg.get(legacy)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
                raise ConfigError(f"sparse_attention_config.{legacy}: must be an integer, got {v!r}")
        _require(c, REQUIRED)
        for legacy, flat in _SPARSE_KEYS.items():
            if legacy in sparse_cfg:
                if flat in c and c[flat] != sparse_cfg[legacy]:
                    raise ConfigError(
                        f"sparse_attention_config.{legacy}={sparse_cfg[legacy]} contradicts {flat}={c[flat]}"
                    )
                kw[flat] = sparse_cfg[legacy]

        n = int(c.get("num_hidden_layers", cls.num_hidden_layers))
        kw["num_hidden_layers"] = n
        kw["layer_types"] = _per_layer(
            c, n, "layer_types", (SPARSE_ATTENTION, FULL_ATTENTION),
            legacy_key="sparse_attention_config.sparse_attention_freq",
            legacy=sparse_cfg.get("sparse_attention_freq", c.get("sparse_attention_freq")),
            legacy_map=lambda f: SPARSE_ATTENTION if f else FULL_ATTENTION,
            default=FULL_ATTENTION,
        )
        kw["mlp_layer_types"] = _per_layer(
            c, n, "mlp_layer_types", ("sparse", "dense"),
            legacy_key="moe_layer_freq", legacy=c.get("moe_layer_freq"),
            legacy_map=lambda f: "sparse" if f else "dense",
            default="sparse",
        )

        if "sparse" in kw["mlp_layer_types"]:
            _require(c, REQUIRED_MOE, " (the model has MoE layers)")
        if "dense" in kw["mlp_layer_types"]:
            _require(c, REQUIRED_DENSE, " (the model has dense MLP layers)")
        if SPARSE_ATTENTION in kw["layer_types"]:
            _require({**c, **kw}, REQUIRED_SPARSE, " (the model has sparse attention layers)")

        heads = int(c.get("num_attention_heads", cls.num_attention_heads))
        kw["head_dim"] = int(c.get("head_dim") or int(c.get("hidden_size", cls.hidden_size)) // heads)

        kw.update(_rope(c, kw["head_dim"], cls.rope_theta))

        dtype = c.get("dtype") or c.get("torch_dtype")
        if dtype is not None:
            kw["dtype"] = str(dtype).replace("torch.", "")
        args = cls(**kw)
        args.validate()
        return args

    def validate(self) -> None:
        def need(cond: bool, key: str, msg: str):
            if not cond:
                raise ConfigError(f"{key}: {msg}")

        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "head_dim", "vocab_size", "num_local_experts", "num_experts_per_tok",
                    "index_n_heads", "index_head_dim"):
            need(int(getattr(self, key)) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
             f"{self.num_key_value_heads} does not divide num_attention_heads={self.num_attention_heads}")
        need(self.num_experts_per_tok <= self.num_local_experts, "num_experts_per_tok",
             f"{self.num_experts_per_tok} > num_local_experts={self.num_local_experts}")
        need(0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0, "rotary_dim",
             f"must be even and in (0, head_dim={self.head_dim}], got {self.rotary_dim}")
        need(self.index_cache_dtype in ("float32", "model"), "index_cache_dtype",
             f"must be 'float32' or 'model', got {self.index_cache_dtype!r}")
        if self.has_sparse_attention:
            need(self.index_block_size >= 1, "index_block_size", f"must be >= 1, got {self.index_block_size}")
            need(self.index_topk_blocks >= 1, "index_topk_blocks", f"must be >= 1, got {self.index_topk_blocks}")
            need(self.index_local_blocks >= 0, "index_local_blocks", f"must be >= 0, got {self.index_local_blocks}")
            # More always-kept local blocks than top-k slots would make the kept set
            # depend on how top-k breaks ties between +inf scores: not a defined model.
            need(self.index_local_blocks <= self.index_topk_blocks, "index_local_blocks",
                 f"{self.index_local_blocks} > index_topk_blocks={self.index_topk_blocks}")
            need(self.num_attention_heads % self.index_n_heads == 0, "index_n_heads",
                 f"{self.index_n_heads} does not divide num_attention_heads={self.num_attention_heads}")
            a, b = sorted((self.index_n_heads, self.num_key_value_heads))
            need(b % a == 0, "index_n_heads",
                 f"{self.index_n_heads} and num_key_value_heads={self.num_key_value_heads}: one must divide the other")

    # -- derived -------------------------------------------------------------------
    @property
    def has_sparse_attention(self) -> bool:
        return SPARSE_ATTENTION in self.layer_types

    def is_sparse_attention(self, layer: int) -> bool:
        return self.layer_types[layer] == SPARSE_ATTENTION

    def is_moe(self, layer: int) -> bool:
        return self.mlp_layer_types[layer] == "sparse"

    @property
    def has_vision_tower(self) -> bool:
        """Model builds the vision tower: the config describes one and the loader has not
        said that the checkpoint lacks its weights (see `with_vision`)."""
        return self.vision_config is not None and self.with_vision is not False



def _rope(c: Dict[str, Any], head_dim: int, default_theta: float) -> Dict[str, Any]:
    """rope_theta, rotary_dim and rope_scaling from any spelling, refusing contradictions."""
    # RoPE: theta and the rotated width come from `rope_parameters` (transformers 5.x),
    # `rope_theta`/`rotary_dim`/`partial_rotary_factor` (published). transformers reads
    # only `partial_rotary_factor`, so two keys that disagree would give two models.
    rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    theta = rope.get("rope_theta", c.get("rope_theta", default_theta))
    if "rope_theta" in rope and "rope_theta" in c and rope["rope_theta"] != c["rope_theta"]:
        raise ConfigError(f"rope_parameters.rope_theta={rope['rope_theta']} contradicts rope_theta={c['rope_theta']}")
    out = {"rope_theta": float(theta)}
    factor = rope.get("partial_rotary_factor", c.get("partial_rotary_factor"))
    rotary_dim = c.get("rotary_dim")
    if factor is not None:
        from_factor = int(head_dim * float(factor))
        if rotary_dim is not None and int(rotary_dim) != from_factor:
            raise ConfigError(
                f"rotary_dim={rotary_dim} contradicts partial_rotary_factor={factor} "
                f"(head_dim {head_dim} x {factor} = {from_factor})"
            )
        rotary_dim = from_factor
    out["rotary_dim"] = int(rotary_dim if rotary_dim is not None else head_dim)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    out["rope_scaling"] = None if rope_type == "default" else rope
    return out


def _per_layer(c, n, key, allowed, *, legacy_key, legacy, legacy_map, default):
    """One entry per layer from the flat key or its legacy 0/1 list; lengths checked."""
    values = c.get(key)
    if values is None and legacy is not None:
        if not isinstance(legacy, (list, tuple)) or len(legacy) != n:
            raise ConfigError(
                f"{legacy_key}: needs one entry per layer ({n}), got "
                f"{len(legacy) if isinstance(legacy, (list, tuple)) else legacy!r}"
            )
        values = [legacy_map(f) for f in legacy]
    if values is None:
        return [default] * n
    if not isinstance(values, (list, tuple)) or len(values) != n:
        got = len(values) if isinstance(values, (list, tuple)) else repr(values)
        raise ConfigError(f"{key}: needs one entry per layer ({n}), got {got}")
    bad = sorted({v for v in values if v not in allowed})
    if bad:
        raise ConfigError(f"{key}: unknown entries {bad}; allowed {list(allowed)}")
    if legacy is not None and [legacy_map(f) for f in legacy] != list(values):
        raise ConfigError(f"{key} contradicts {legacy_key}")
    return list(values)
