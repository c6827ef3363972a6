"""The MiniMax-M3 text model under mlx-lm's model contract (Model, ModelArgs, sanitize, make_cache)."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache

from . import decode
from .attention import Attention
from .cache import SparseKVCache
from .config import ModelArgs
from .layers import DenseMLP, GemmaRMSNorm
from .moe import SparseMoeBlock


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(args, layer_idx)
        self.is_moe = args.is_moe(layer_idx)
        self.mlp = SparseMoeBlock(args) if self.is_moe else DenseMLP(args, args.dense_intermediate_size)
        self.input_layernorm = GemmaRMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = GemmaRMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        if decode.usable(self, x, cache):
            return decode.step(self, x, cache)
        h = x + self.self_attn(self.input_layernorm(x), cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class TextModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = GemmaRMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings: Optional[mx.array] = None) -> mx.array:
        if getattr(self, "pipeline_stage", None) is not None:  # set by Model.pipeline
            return self.pipeline_stage(self, inputs, cache, input_embeddings)
        h = self.embed_tokens(inputs) if input_embeddings is None else input_embeddings
        if cache is None:
            cache = [None] * len(self.layers)
        for layer, c in zip(self.layers, cache):
            h = layer(h, c)
        return self.norm(h)


class LanguageModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = TextModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs, cache=None, input_embeddings=None):
        h = self.model(inputs, cache, input_embeddings)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.language_model = LanguageModel(args)

    def __call__(self, inputs: mx.array, cache: Optional[List[Any]] = None,
                 input_embeddings: Optional[mx.array] = None) -> mx.array:
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"cache has {len(cache)} entries for {len(self.layers)} layers; use model.make_cache()")
        if cache is not None and cache[0] is not None:
            n = cache[0].offset + inputs.shape[-1]
            if n > self.args.max_position_embeddings:
                raise ValueError(
                    f"context of {n} tokens exceeds max_position_embeddings={self.args.max_position_embeddings}"
                )
        elif inputs.shape[-1] > self.args.max_position_embeddings:
            raise ValueError(
                f"prompt of {inputs.shape[-1]} tokens exceeds max_position_embeddings="
                f"{self.args.max_position_embeddings}"
            )
        return self.language_model(inputs, cache, input_embeddings)

    @property
    def layers(self):
        return self.language_model.model.layers

    # -- vision (see vision.py) ---------------------------------------------------------------
    # The tower is built when the config has a vision_config AND the checkpoint holds its
    # weights (sanitize builds it on seeing them), so text-only checkpoints load as before.
    @property
    def has_vision(self) -> bool:
        from .vision import has_vision

        return has_vision(self)

    def build_vision(self) -> None:
        """Add `vision_tower` and `multi_modal_projector` as the config's vision_config says."""
        from .vision import build_vision

        build_vision(self)

    def get_input_embeddings(self, input_ids, pixel_values=None, image_grid_thw=None,
                             pixel_values_videos=None, video_grid_thw=None, feature_cache=None) -> mx.array:
        """[B, L, hidden] embeddings of `input_ids` with the image / video placeholder tokens
        replaced by the projected vision features (processor outputs: pixel_values [patches,
        C*T*P*P] and grid_thw [entries, 3]); pass the result as `input_embeddings`. A
        placeholder count that does not match the features raises vision.PlaceholderMismatch."""
        from .vision import get_input_embeddings

        return get_input_embeddings(self, input_ids, pixel_values, image_grid_thw, pixel_values_videos,
                                    video_grid_thw, feature_cache)

    def shard(self, group=None):
        """Tensor parallelism over `group` (see distributed.shard_model)."""
        from .distributed import shard_model

        return shard_model(self, group)

    def pipeline(self, group, split=None):
        """Keep only this rank's pipeline stage of layers (see distributed.pipeline_model)."""
        from .distributed import pipeline_model

        return pipeline_model(self, group, split)

    def make_cache(self) -> List[Any]:
        """One cache per layer: SparseKVCache (K, V and index keys) on MSA layers."""
        return [
            SparseKVCache(self.args.index_block_size, layer.self_attn.index_dtype)
            if layer.self_attn.is_sparse else KVCache()
            for layer in self.layers
        ]

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        """Map any released checkpoint layout onto this model's parameter names.

        See checkpoint.sanitize: original, transformers 5.x re-save, MXFP8 / FP8-ue8m0
        (kept packed; this switches the matching layers to mxfp8 QuantizedLinear), FP8 with
        128x128 float scales (dequantised), and already-converted MLX weights (unchanged).
        """
        from .checkpoint import sanitize

        return sanitize(self, weights)

    @property
    def cast_predicate(self) -> Callable[[str], bool]:
        # The router's bias decides expert choice by small margins: keep it float32.
        return lambda k: "e_score_correction_bias" not in k

    @property
    def quant_predicate(self) -> Callable[[str, nn.Module], Any]:
        # The router is a plain Module (never quantised); everything else follows the recipe.
        return lambda path, module: hasattr(module, "to_quantized")
