"""Building blocks shared by attention and the MLPs: Gemma RMSNorm, partial RoPE, SwiGLU-OAI MLP."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_inplace
from mlx_lm.models.activations import SwigluOAI
from mlx_lm.models.rope_utils import initialize_rope

from ..config import ModelArgs


class GemmaRMSNorm(nn.Module):
    """RMSNorm scaled by (1 + weight): the checkpoint stores the offset from one."""

    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, 1.0 + self.weight, self.eps)


def partial_rope(args: ModelArgs, dims: int) -> nn.Module:
    """RoPE on the first `dims` channels of each head (rotate-half layout), the rest untouched."""
    return initialize_rope(
        dims,
        base=args.rope_theta,
        traditional=False,
        scaling_config=args.rope_scaling,
        max_position_embeddings=args.max_position_embeddings,
    )


def swiglu_oai(args: ModelArgs) -> nn.Module:
    # mlx-lm's GPT-OSS activation is the reference's: gate clamped above only, up clamped
    # both ways, (up + 1) * gate * sigmoid(alpha * gate).
    return SwigluOAI(alpha=args.swiglu_alpha, limit=args.swiglu_limit)


class DenseMLP(nn.Module):
    """SwiGLU-OAI MLP: the dense layers' MLP and the MoE's shared expert."""

    def __init__(self, args: ModelArgs, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, args.hidden_size, bias=False)
        self.activation = swiglu_oai(args)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.activation(self.up_proj(x), self.gate_proj(x)))

    def shard(self, group) -> None:
        """Keep this rank's slice of the intermediate dimension; the output is then a partial sum."""
        shard_inplace(self.gate_proj, "all-to-sharded", group=group)
        shard_inplace(self.up_proj, "all-to-sharded", group=group)
        shard_inplace(self.down_proj, "sharded-to-all", group=group)
