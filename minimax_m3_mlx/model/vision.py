"""MiniMax-M3's vision side in MLX: the vision tower, its projector, and placeholder merging.

As transformers' `minimax_m3_vl` defines it (MiniMaxM3VLVisionModel, MiniMaxM3VLMultiModalProjector,
MiniMaxM3VLModel.forward):
- patch embedding: a Conv3d with kernel = stride = (temporal_patch_size, patch, patch) and no
  bias, i.e. one matmul on the processor's flattened (C, T, P, P) patches;
- 3-D axial RoPE: head_dim // 3 rounded down to even channels per axis (t, h, w), equal
  frequency bands, on the first 3 x that channels of each head; the rest passes through;
- pre-layernorm, then CLIP encoder layers (LayerNorm, attention with biases, GELU MLP);
  attention never crosses a grid entry (an image, or one chunk of a video: the reference's
  cu_seqlens with merge_temporal=True), so the tower runs one entry at a time here, which
  bounds its memory by the largest entry;
- projector: linear_2(gelu(linear_1(x))) per patch, then each 2x2 merge block (consecutive in
  the processor's patch order) concatenated and fused by merge_linear_2(gelu(merge_linear_1));
- the features replace the image / video placeholder tokens in prompt order.

Parameter names (ours) are transformers' without the leading `model.`:
`vision_tower.embeddings.proj.weight` [E, C, T, P, P], `vision_tower.pre_layrnorm.*`,
`vision_tower.layers.N.{self_attn.{q,k,v,out}_proj, layer_norm1, layer_norm2, mlp.fc1, mlp.fc2}.*`,
`multi_modal_projector.{linear_1, linear_2, merge_linear_1, merge_linear_2}.*`
(weights/vision_names.py maps the published and the transformers 5.x names onto them).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..config import ConfigError

DEFAULT_PROJECTOR_HIDDEN = 6144  # MiniMaxM3VLConfig.projector_hidden_size's default


# -- config ------------------------------------------------------------------------------------------
_ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x),  # transformers' "gelu": exact erf GELU
    "gelu_pytorch_tanh": lambda x: nn.gelu_approx(x),
    "gelu_new": lambda x: nn.gelu_approx(x),
    "quick_gelu": lambda x: x * mx.sigmoid(1.702 * x),
}


@dataclass
class VisionArgs:
    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    num_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_head_dim: Optional[int] = None  # the reference's RoPE reads `head_dim` when the config has one

    @classmethod
    def from_dict(cls, c: Dict[str, Any]) -> "VisionArgs":
        if not isinstance(c, dict):
            raise ConfigError(f"vision_config must be a JSON object, got {type(c).__name__}")
        kw = {k: c[k] for k in cls.__dataclass_fields__ if k in c and k not in ("rope_theta", "rope_head_dim")}
        rope = dict(c.get("rope_parameters") or {})
        rope_type = rope.get("rope_type", rope.get("type", "axial"))
        if rope_type != "axial":
            raise ConfigError(f"vision_config.rope_parameters.rope_type: only 'axial' exists for this tower, got {rope_type!r}")
        theta = rope.get("rope_theta", c.get("rope_theta", cls.rope_theta))
        kw["rope_theta"] = float(theta)
        if c.get("head_dim"):
            kw["rope_head_dim"] = int(c["head_dim"])
        args = cls(**kw)
        args.validate()
        return args

    def validate(self) -> None:
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_channels", "patch_size", "temporal_patch_size", "spatial_merge_size"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"vision_config.{key}: must be >= 1, got {getattr(self, key)}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"vision_config.num_attention_heads: {self.num_attention_heads} does not divide "
                              f"hidden_size={self.hidden_size}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ConfigError(f"vision_config.hidden_act: {self.hidden_act!r} is not one of {sorted(_ACTIVATIONS)}")
        if 3 * self.rope_dims_per_axis > self.head_dim:
            raise ConfigError(f"vision_config.head_dim: {self.rope_head_dim} gives 3 x {self.rope_dims_per_axis} "
                              f"rotary channels, more than the attention head_dim {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rope_dims_per_axis(self) -> int:
        """Channels per axis (t, h, w): 2 * ((head_dim // 3) // 2), as the reference."""
        return 2 * (((self.rope_head_dim or self.head_dim) // 3) // 2)

    @property
    def patch_dim(self) -> int:
        return self.num_channels * self.temporal_patch_size * self.patch_size * self.patch_size


# -- the tower -------------------------------------------------------------------------------------------
class PatchProjection(nn.Module):
    """The Conv3d (stride = kernel, no bias) as a matmul; the weight keeps the conv's [E, C, T, P, P]."""

    def __init__(self, a: VisionArgs):
        super().__init__()
        self.weight = mx.zeros((a.hidden_size, a.num_channels, a.temporal_patch_size, a.patch_size, a.patch_size))

    def __call__(self, patches: mx.array) -> mx.array:
        w = self.weight.reshape(self.weight.shape[0], -1)
        return patches.astype(w.dtype) @ w.T


class VisionEmbeddings(nn.Module):
    def __init__(self, a: VisionArgs):
        super().__init__()
        self.proj = PatchProjection(a)

    def __call__(self, patches: mx.array) -> mx.array:
        return self.proj(patches)


def vision_position_ids(grid: Tuple[int, int, int], merge: int) -> np.ndarray:
    """(t*h*w, 3) positions (t, h, w) of the patches of one grid entry, in the processor's
    order: frame-major, then 2x2 merge blocks row-major, then within the block row-major."""
    t, h, w = grid
    hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // merge, merge, w // merge, merge)
    hh = hh.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    ww = ww.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    tt = np.repeat(np.arange(t), h * w)
    return np.stack([tt, np.tile(hh, t), np.tile(ww, t)], axis=-1)


class VisionRotary(nn.Module):
    def __init__(self, a: VisionArgs):
        super().__init__()
        d = a.rope_dims_per_axis
        self._inv_freq = 1.0 / (a.rope_theta ** (mx.arange(0, d, 2, dtype=mx.float32) / d))
        self.merge = a.spatial_merge_size

    def __call__(self, grid: Tuple[int, int, int], dtype) -> Tuple[mx.array, mx.array]:
        pos = mx.array(vision_position_ids(grid, self.merge).astype(np.float32))
        freqs = (pos[..., None] * self._inv_freq).reshape(pos.shape[0], -1)  # [N, 3F]: t | h | w bands
        freqs = mx.concatenate([freqs, freqs], axis=-1)
        return mx.cos(freqs).astype(dtype), mx.sin(freqs).astype(dtype)


def _rotate_half(x: mx.array) -> mx.array:
    x1, x2 = mx.split(x, 2, axis=-1)
    return mx.concatenate([-x2, x1], axis=-1)


def apply_vision_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """x [B, L, H, D]; cos/sin [L, R] rotate the first R channels of each head."""
    r = cos.shape[-1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    rot, rest = x[..., :r], x[..., r:]
    rot = rot * cos + _rotate_half(rot) * sin
    return mx.concatenate([rot, rest], axis=-1) if rest.shape[-1] else rot


class VisionAttention(nn.Module):
    # Queries per attention call: bounds the [H, q, L] score block on backends that materialise it.
    query_block = 4096

    def __init__(self, a: VisionArgs):
        super().__init__()
        d = a.hidden_size
        self.n_heads = a.num_attention_heads
        self.head_dim = a.head_dim
        self.scale = self.head_dim ** -0.5
        self.q_proj = nn.Linear(d, d, bias=True)
        self.k_proj = nn.Linear(d, d, bias=True)
        self.v_proj = nn.Linear(d, d, bias=True)
        self.out_proj = nn.Linear(d, d, bias=True)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        B, L, _ = x.shape
        q = apply_vision_rope(self.q_proj(x).reshape(B, L, self.n_heads, self.head_dim), cos, sin)
        k = apply_vision_rope(self.k_proj(x).reshape(B, L, self.n_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).reshape(B, L, self.n_heads, self.head_dim)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        if L <= self.query_block:
            o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            o = mx.concatenate([
                mx.fast.scaled_dot_product_attention(q[:, :, i:i + self.query_block], k, v, scale=self.scale)
                for i in range(0, L, self.query_block)
            ], axis=2)
        return self.out_proj(o.transpose(0, 2, 1, 3).reshape(B, L, -1))


class VisionMLP(nn.Module):
    def __init__(self, a: VisionArgs):
        super().__init__()
        self.fc1 = nn.Linear(a.hidden_size, a.intermediate_size, bias=True)
        self.fc2 = nn.Linear(a.intermediate_size, a.hidden_size, bias=True)
        self.act = _ACTIVATIONS[a.hidden_act]

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.act(self.fc1(x)))


class VisionEncoderLayer(nn.Module):
    def __init__(self, a: VisionArgs):
        super().__init__()
        self.self_attn = VisionAttention(a)
        self.layer_norm1 = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)
        self.mlp = VisionMLP(a)
        self.layer_norm2 = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)

    def __call__(self, x, cos, sin):
        x = x + self.self_attn(self.layer_norm1(x), cos, sin)
        return x + self.mlp(self.layer_norm2(x))


class VisionModel(nn.Module):
    """The tower: patches of ONE grid entry (an image or a video chunk) -> [t*h*w, hidden]."""

    def __init__(self, a: VisionArgs):
        super().__init__()
        self.args = a
        self.embeddings = VisionEmbeddings(a)
        self.pre_layrnorm = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)
        self.layers = [VisionEncoderLayer(a) for _ in range(a.num_hidden_layers)]
        self.rotary = VisionRotary(a)

    def __call__(self, patches: mx.array, grid: Sequence[int]) -> mx.array:
        t, h, w = (int(g) for g in grid)
        check_grid(self.args, patches, [(t, h, w)])
        x = self.embeddings(patches)
        cos, sin = self.rotary((t, h, w), x.dtype)
        x = self.pre_layrnorm(x)[None]
        for layer in self.layers:
            x = layer(x, cos, sin)
        return x[0]


class MultiModalProjector(nn.Module):
    def __init__(self, a: VisionArgs, text_hidden: int, projector_hidden: int):
        super().__init__()
        self.merge = a.spatial_merge_size
        self.linear_1 = nn.Linear(a.hidden_size, projector_hidden, bias=True)
        self.linear_2 = nn.Linear(projector_hidden, text_hidden, bias=True)
        self.merge_linear_1 = nn.Linear(text_hidden * self.merge ** 2, projector_hidden, bias=True)
        self.merge_linear_2 = nn.Linear(projector_hidden, text_hidden, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        """[N, vision hidden] patches (N a multiple of merge^2) -> [N / merge^2, text hidden]."""
        x = self.linear_2(nn.gelu(self.linear_1(x)))
        x = x.reshape(x.shape[0] // self.merge ** 2, -1)
        return self.merge_linear_2(nn.gelu(self.merge_linear_1(x)))


def check_grid(a: VisionArgs, pixel_values, grids: Sequence[Tuple[int, int, int]], what: str = "pixel_values") -> None:
    """The processor's contract: [sum(t*h*w), C*T*P*P] rows, h and w multiples of the merge size."""
    if pixel_values.ndim != 2 or pixel_values.shape[1] != a.patch_dim:
        raise ValueError(
            f"{what}: expected [patches, {a.patch_dim}] (channels {a.num_channels} x temporal "
            f"{a.temporal_patch_size} x {a.patch_size} x {a.patch_size}), got {tuple(pixel_values.shape)}"
        )
    for g in grids:
        if len(g) != 3 or min(g) < 1 or g[1] % a.spatial_merge_size or g[2] % a.spatial_merge_size:
            raise ValueError(f"{what}: grid (t, h, w) = {tuple(g)} is not a whole number of "
                             f"{a.spatial_merge_size}x{a.spatial_merge_size} merge blocks")
    n = sum(int(t) * int(h) * int(w) for t, h, w in grids)
    if n != pixel_values.shape[0]:
        raise ValueError(f"{what}: the grids describe {n} patches, {what} has {pixel_values.shape[0]} rows")


# -- features, cached per grid entry ------------------------------------------------------------------
class FeatureCache:
    """Projected features per image / video chunk, keyed by the exact pixels and grid (LRU by bytes).

    Repeated prompts with the same image skip the tower. The key is a hash of the patch bytes,
    so a changed image (or a changed processor setting) is a new entry, never a stale hit.
    """

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes = int(max_bytes)
        self._items: "OrderedDict[str, mx.array]" = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(patches: np.ndarray, grid: Tuple[int, int, int], dtype) -> str:
        h = hashlib.sha256(np.ascontiguousarray(patches).tobytes())
        h.update(repr((tuple(int(g) for g in grid), str(patches.dtype), patches.shape, str(dtype))).encode())
        return h.hexdigest()

    def get(self, key: str) -> Optional[mx.array]:
        v = self._items.get(key)
        if v is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return v

    def put(self, key: str, value: mx.array) -> None:
        if key in self._items:
            return
        self._items[key] = value
        self.nbytes += value.nbytes
        while self.nbytes > self.max_bytes and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self.nbytes -= old.nbytes

    def clear(self) -> None:
        self._items.clear()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._items)


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, mx.array):
        return np.array(x.astype(mx.float32) if x.dtype == mx.bfloat16 else x)
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _grids(grid_thw) -> List[Tuple[int, int, int]]:
    g = _as_numpy(grid_thw).astype(np.int64).reshape(-1, 3)
    return [tuple(int(v) for v in row) for row in g]


def encode_grids(model, pixel_values, grid_thw, cache: Optional[FeatureCache] = None,
                 what: str = "pixel_values") -> mx.array:
    """Tower + projector over each grid entry in turn -> [sum(t*h*w) / merge^2, text hidden].

    Each entry is evaluated before the next starts, so the peak memory is one entry's.
    """
    tower, projector = model.vision_tower, model.multi_modal_projector
    a = tower.args
    grids = _grids(grid_thw)
    pix = _as_numpy(pixel_values)
    check_grid(a, pix, grids, what)
    dtype = tower.embeddings.proj.weight.dtype
    out, start = [], 0
    for g in grids:
        n = g[0] * g[1] * g[2]
        rows = pix[start:start + n]
        start += n
        key = FeatureCache.key(rows, g, dtype) if cache is not None else None
        feats = cache.get(key) if cache is not None else None
        if feats is None:
            feats = projector(tower(mx.array(rows), g))
            mx.eval(feats)
            if cache is not None:
                cache.put(key, feats)
        out.append(feats)
    return mx.concatenate(out, axis=0) if len(out) > 1 else out[0]


# -- placeholders ------------------------------------------------------------------------------------------
class PlaceholderMismatch(ValueError):
    """The prompt's image / video placeholder tokens do not match the features given."""


def merge_features(embeds: mx.array, input_ids: np.ndarray, token_id: int, features: Optional[mx.array],
                   what: str) -> mx.array:
    """embeds [B, L, D] with the rows at `token_id` replaced, in order, by `features` [N, D]."""
    mask = np.asarray(input_ids) == token_id
    n_tokens = int(mask.sum())
    n_feats = 0 if features is None else int(features.shape[0])
    if n_tokens != n_feats:
        raise PlaceholderMismatch(
            f"{what} features and {what} tokens do not match: the prompt has {n_tokens} {what} "
            f"placeholder token(s) (id {token_id}), the {what} input gives {n_feats} feature row(s). "
            f"Build the prompt with the processor, which expands each {what} marker to its token count."
        )
    if n_tokens == 0:
        return embeds
    flat = mask.reshape(-1)
    src = np.clip(np.cumsum(flat) - 1, 0, None).reshape(mask.shape)  # feature row per position
    gathered = features.astype(embeds.dtype)[mx.array(src)]  # [B, L, D]
    return mx.where(mx.array(mask)[..., None], gathered, embeds)


def get_input_embeddings(model, input_ids, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
                         video_grid_thw=None, feature_cache: Optional[FeatureCache] = None) -> mx.array:
    """Token embeddings of `input_ids` [B, L] with the image and video placeholders replaced."""
    ids = _as_numpy(input_ids).astype(np.int64)
    if ids.ndim == 1:
        ids = ids[None]
    text_model = model.language_model.model
    if text_model.embed_tokens is None:
        # A later pipeline stage: it receives the first stage's hidden states, which hold the
        # image rows, and needs only their shape (the tower is on the first stage).
        return mx.zeros((*ids.shape, model.args.hidden_size), text_model.norm.weight.dtype)
    embeds = text_model.embed_tokens(mx.array(ids))
    args = model.args
    has_media = pixel_values is not None or pixel_values_videos is not None
    if has_media and not has_vision(model):
        raise ValueError(
            "this model has no vision tower: its config has no vision_config, or its checkpoint has no "
            "vision weights (a text-only conversion); load a checkpoint with the vision tower"
        )
    for what, pix, grid, tok in (("image", pixel_values, image_grid_thw, args.image_token_index),
                                 ("video", pixel_values_videos, video_grid_thw, args.video_token_index)):
        if pix is not None and grid is None:
            raise ValueError(f"{what} pixel values given without their grid_thw")
        feats = None
        if pix is not None:
            feats = encode_grids(model, pix, grid, feature_cache, what=f"{what} pixel values")
        embeds = merge_features(embeds, ids, tok, feats, what)
    return embeds


def has_vision(model) -> bool:
    return "vision_tower" in model and "multi_modal_projector" in model


def vision_modules(args) -> Tuple[VisionModel, MultiModalProjector]:
    """The vision tower and projector that `args.vision_config` describes (Model builds them)."""
    if args.vision_config is None:
        raise ConfigError("vision_config: this config describes no vision tower")
    a = VisionArgs.from_dict(args.vision_config)
    projector_hidden = args.projector_hidden_size or DEFAULT_PROJECTOR_HIDDEN
    return VisionModel(a), MultiModalProjector(a, args.hidden_size, int(projector_hidden))
