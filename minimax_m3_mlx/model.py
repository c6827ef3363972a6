"""The MiniMax-M3 text model under mlx-lm's model contract (Model, ModelArgs, sanitize, make_cache)."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache

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
        h = x + self.self_attn(self.input_layernorm(x), cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class TextModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = GemmaRMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings: Optional[mx.array] = None) -> mx.array:
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

    def make_cache(self) -> List[Any]:
        """One cache per layer: SparseKVCache (K, V and index keys) on MSA layers."""
        return [
            SparseKVCache(self.args.index_block_size) if layer.self_attn.is_sparse else KVCache()
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
