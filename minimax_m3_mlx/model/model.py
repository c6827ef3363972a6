"""The MiniMax-M3 model under mlx-lm's model contract: Model, sanitize, shard, pipeline, make_cache."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import KVCache

from ..config import ModelArgs
from ..weights.sanitize import sanitize
from ..weights.sharding import (
    ShardingError, check_pipeline, check_tensor_parallel, default_split, stage_layers, table_from_arrays,
)
from ..io.reader import StoredTensor
from . import batch_decode, decode, experts, vision
from .attention import Attention
from .cache import SparseKVCache
from .expert_copies import CopyingLayerExperts
from .expert_trace import ExpertTrace
from .kvquant import DEFAULT_INDEX_BITS, QuantizedSparseKVCache
from .collectives import Stages, all_sum
from .layers import DenseMLP, GemmaRMSNorm
from .moe import Router, SparseMoeBlock


def _longest(cache) -> int:
    """The longest sequence in the caches; under batched generation offsets are one per row,
    and a BatchSparseCache knows them without reading the device."""
    for c in cache:
        if hasattr(c, "lengths"):
            return max(c.lengths, default=0)
    offset = cache[0].offset
    return int(offset.max()) if isinstance(offset, mx.array) else offset


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(args, layer_idx)
        self.is_moe = args.is_moe(layer_idx)
        self.mlp = SparseMoeBlock(args) if self.is_moe else DenseMLP(args, args.dense_intermediate_size)
        self.input_layernorm = GemmaRMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = GemmaRMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        # Set by shard(): attention and MLP then return this rank's partial sums.
        self.sharding_group = None

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        if decode.usable(self, x, cache):
            return decode.step(self, x, cache)
        if batch_decode.usable(self, x, cache):
            return batch_decode.step(self, x, cache)
        h = x + self._summed(self.self_attn(self.input_layernorm(x), cache))
        return h + self._summed(self.mlp(self.post_attention_layernorm(h)))

    def _summed(self, y: mx.array) -> mx.array:
        return y if self.sharding_group is None else all_sum(y, self.sharding_group)

    def shard(self, group) -> None:
        """Keep this rank's heads and intermediate slices; one all-sum after attention, one after the MLP."""
        self.self_attn.shard(group)
        self.mlp.shard(group)
        self.sharding_group = group


class TextModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.hidden_size = args.hidden_size
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = GemmaRMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        # Set by Model.pipeline: this rank's stage, where its layers start, the layers per stage.
        self.pipeline_stage: Optional[Stages] = None
        self.layer_offset = 0
        self.pipeline_split: Optional[tuple] = None

    def __call__(self, inputs: mx.array, cache=None, input_embeddings: Optional[mx.array] = None) -> mx.array:
        if cache is None:
            cache = [None] * len(self.layers)
        if self.pipeline_stage is not None:
            return self._stage(inputs, cache, input_embeddings)
        h = self.embed_tokens(inputs) if input_embeddings is None else input_embeddings
        for layer, c in zip(self.layers, cache):
            h = layer(h, c)
        return self.norm(h)

    def _stage(self, inputs, cache, input_embeddings) -> mx.array:
        """One pipeline stage: receive (or embed), run this rank's layers, hand on; every rank
        returns the last stage's output (what mlx-lm's generate loop needs)."""
        st = self.pipeline_stage
        dtype = self.norm.weight.dtype
        if st.first:
            h = self.embed_tokens(inputs) if input_embeddings is None else input_embeddings
        else:
            shape = tuple(input_embeddings.shape) if input_embeddings is not None else (*inputs.shape, self.hidden_size)
            h = st.receive(shape, dtype)
        for layer, c in zip(self.layers, cache):
            h = layer(h, c)
        h = h.astype(dtype)
        if not st.last:
            h = st.send(h)
            if cache and cache[-1] is not None:
                # Evaluating the cache (as mlx-lm's prefill does) must also perform the send.
                keys = cache[-1].keys
                if isinstance(keys, (tuple, list)):  # a quantized cache: (words, scales, biases)
                    cache[-1].keys = (mx.depends(keys[0], h), *keys[1:])
                else:
                    cache[-1].keys = mx.depends(keys, h)
        return self.norm(st.gather_output(h))


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
        # The tower exists when the config describes one and the loader has not said the
        # checkpoint lacks its weights (ModelArgs.with_vision): text-only checkpoints load as before.
        if args.has_vision_tower:
            self.vision_tower, self.multi_modal_projector = vision.vision_modules(args)
        self.tensor_group = None  # set by shard()
        # Set by the per-rank loader on a pipeline stage without the token embedding when the
        # checkpoint has a tower: the first stage holds it, this stage takes image prompts too.
        self.vision_elsewhere = False
        self.expert_streamer = None  # set by stream_experts()
        self.load_stats = None  # set by the per-rank loader (loading/sharded.py): what it read
        self.checkpoint_layout = None  # set by the loaders: the folder's layout and quantization, in words
        # Index-key bits of the caches make_cache builds (--index-bits; kvquant.INDEX_BITS):
        # 16 / 32 store them in the model dtype / float32; 4 / 8 apply once --kv-bits
        # quantizes the cache. None: index_cache_dtype, and 8 bits once quantized.
        self.index_bits = None

    def __call__(self, inputs: mx.array, cache: Optional[List[Any]] = None,
                 input_embeddings: Optional[mx.array] = None) -> mx.array:
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"cache has {len(cache)} entries for {len(self.layers)} layers; use model.make_cache()")
        if cache is not None and cache[0] is not None:
            offset = _longest(cache)
            n = offset + inputs.shape[-1]
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
    @property
    def has_vision(self) -> bool:
        return vision.has_vision(self) or self.vision_elsewhere

    def get_input_embeddings(self, input_ids, pixel_values=None, image_grid_thw=None,
                             pixel_values_videos=None, video_grid_thw=None, feature_cache=None) -> mx.array:
        """[B, L, hidden] embeddings of `input_ids` with the image / video placeholder tokens
        replaced by the projected vision features (processor outputs: pixel_values [patches,
        C*T*P*P] and grid_thw [entries, 3]); pass the result as `input_embeddings`. A
        placeholder count that does not match the features raises vision.PlaceholderMismatch."""
        return vision.get_input_embeddings(self, input_ids, pixel_values, image_grid_thw, pixel_values_videos,
                                           video_grid_thw, feature_cache)

    def embed_inputs(self, input_ids, pixel_values=None) -> mx.array:
        """mlx-lm's server contract: [L] ids -> [L, hidden] embeddings, the image placeholders
        filled from `pixel_values`, one (pixel rows, grid_thw) pair per image, in order
        (serving.multimodal.ServerImages makes them)."""
        pix = np.concatenate([p for p, _ in pixel_values]) if pixel_values else None
        grid = np.stack([g for _, g in pixel_values]) if pixel_values else None
        return self.get_input_embeddings(np.asarray(input_ids)[None], pix, grid)[0]

    # -- parallelism ----------------------------------------------------------------------------
    def shard(self, group=None):
        """Tensor parallelism over `group` (an mx.distributed Group, or a collectives.ChainGroup).

        Rank r keeps KV heads [r*Hkv/N, (r+1)*Hkv/N), the query heads of those groups and
        the index heads that serve them, so every group's block selection is computed on one
        rank from the index scores the single-machine model computes; the single index key
        per token is replicated. Routed experts, the shared expert and dense MLPs keep their
        slice of the intermediate dimension. Embeddings, lm_head, norms and the router are
        replicated. Checked (weights.sharding.check_tensor_parallel) before anything changes.
        """
        group = group or mx.distributed.init()
        n = group.size()
        if n == 1:
            return self
        if self.tensor_group is not None:
            raise ShardingError("the model is already sharded")
        check_tensor_parallel(self.args, table_from_arrays(dict(tree_flatten(self.parameters()))), n)
        for layer in self.layers:
            layer.shard(group)
        self.tensor_group = group
        return self

    def pipeline(self, group, split: Optional[Sequence[int]] = None):
        """Keep only this rank's pipeline stage of layers. `group`: an mx Group or collectives.Stages.

        `split`: layers per stage (entry s for stage s; the last stage runs the first layers),
        by default balanced by weight bytes. Afterwards `layers` holds only this rank's layers
        (numbered from 0; `layer_offset` maps back) and only the first stage keeps the embedding.
        """
        stages = group if isinstance(group, Stages) else Stages(group, 1)
        P = stages.size()
        if P == 1:
            return self
        tm = self.language_model.model
        if tm.pipeline_stage is not None:
            raise ShardingError("the model is already split into pipeline stages")
        n = len(tm.layers)
        if split is None:
            check_pipeline(n, P)
            split = default_split(self.args, table_from_arrays(dict(tree_flatten(self.parameters()))), P)
        check_pipeline(n, P, split)
        start, end = stage_layers(split, stages.stage)
        tm.layers = tm.layers[start:end]
        tm.layer_offset = start
        tm.pipeline_split = tuple(split)
        if not stages.first and not self.args.tie_word_embeddings:
            tm.embed_tokens = None
        tm.pipeline_stage = stages
        return self

    # -- experts streamed from disk (experts.py) ------------------------------------------------
    def stream_experts(self, tensors: Dict[str, StoredTensor], expert_memory: int,
                       prefetch: bool = True, direct: Optional[bool] = None) -> experts.ExpertStreamer:
        """Keep the routed experts on disk and `expert_memory` bytes of them in per-layer slot pools.

        `tensors`: where the checkpoint stores each switch_mlp tensor (io.reader.locate), in
        this model's names; after pipeline() only this stage's layers are streamed, after
        shard() only this rank's slice of every expert (experts.rank_parts): `expert_memory`
        is this process's budget. Call it before loading the other weights: the pools
        replace the experts' parameters.
        direct: read misses straight into the pools (default: where the backend allows it,
        experts.writes_in_place); False copies through buffers (expert_copies.py).
        """
        offset = self.language_model.model.layer_offset
        moe = [(offset + i, layer.mlp) for i, layer in enumerate(self.layers) if layer.is_moe]
        if not moe:
            raise experts.ExpertMemoryError("--expert-memory: this model has no routed experts")
        stored = [experts.layer_tensors(tensors, i) for i, _ in moe]
        group = self.tensor_group
        parts = experts.layer_parts(stored[0], *((group.size(), group.rank()) if group is not None else (1, 0)))
        n_slots = experts.slots_for(expert_memory, stored, self.args.num_experts_per_tok, parts)
        streamer = experts.ExpertStreamer(prefetch=prefetch)
        streamer.read_ahead = experts.read_ahead_bytes(n_slots, stored, self.args.num_experts_per_tok)
        direct = experts.writes_in_place() if direct is None else direct
        kind = experts.DirectLayerExperts if direct else CopyingLayerExperts
        for t, (_, block) in zip(stored, moe):
            layer = kind(streamer, t, n_slots, block.gate, parts)
            streamer.layers.append(layer)
            block.stream(layer)
        self.expert_streamer = streamer
        return streamer

    def record_experts(self, trace: Optional[ExpertTrace]) -> None:
        """Record every MoE layer's routing into `trace` (expert_trace.py); None stops."""
        offset = self.language_model.model.layer_offset
        for i, layer in enumerate(self.layers):
            if layer.is_moe:
                layer.mlp.trace = None if trace is None else trace.for_layer(offset + i)
                layer.__dict__.pop("_decode_fns", None)  # decode.pieces compiles the MoE only when untraced

    # -- mlx-lm's contract --------------------------------------------------------------------
    def make_cache(self, kv_bits: Optional[int] = None, kv_group_size: int = 64) -> List[Any]:
        """One cache per layer: SparseKVCache (K, V and index keys) on MSA layers.

        kv_bits: quantized from the first token (kvquant.QuantizedSparseKVCache on every
        layer, without index keys on full-attention ones: unlike mlx-lm's QuantizedKVCache
        it merges into a batch). mlx-lm's own route, to_quantized after
        --quantized-kv-start tokens, starts from the plain caches made without it.
        """
        bits = self.index_bits
        if kv_bits is not None:
            index_bits = DEFAULT_INDEX_BITS if bits is None else bits
            return [QuantizedSparseKVCache(self.args.index_block_size, kv_group_size, kv_bits, index_bits)
                    for _ in self.layers]
        return [
            SparseKVCache(self.args.index_block_size,
                          {16: None, 32: "float32"}.get(bits, layer.self_attn.index_dtype), bits)
            if layer.self_attn.is_sparse else KVCache()
            for layer in self.layers
        ]

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        """Map any released checkpoint layout, or a folder mlx-lm's or mlx-vlm's converter wrote,
        onto this model's parameter names (weights/sanitize.py).

        Names only: the model is not changed. Vision tensors are kept when the model has a
        tower and left out otherwise. MX-packed layers (MXFP8, FP8 with ue8m0 scales) stay
        packed where the caller makes them mxfp8 layers (mlx-lm's loader does for
        `quant_method: mxfp8`; this package's loader always) and are dequantised otherwise.
        """
        keep_packed = (self.args.quantization_config or {}).get("quant_method") == "mxfp8"
        out, _ = sanitize(self.args, weights, vision=self.has_vision, keep_packed=keep_packed)
        return out

    @property
    def cast_predicate(self) -> Callable[[str], bool]:
        # The router's bias decides expert choice by small margins: keep it float32.
        return lambda k: "e_score_correction_bias" not in k

    @property
    def quant_predicate(self) -> Callable[[str, nn.Module], Any]:
        # The router stays unquantised (routing flips on small weight errors; it is tiny); it
        # has a to_quantized only to load folders other converters quantized it in.
        return lambda path, module: hasattr(module, "to_quantized") and not isinstance(module, Router)
