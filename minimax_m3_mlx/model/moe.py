"""Mixture of experts: sigmoid top-k router with a choice-only bias, routed experts, shared expert."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx.nn.layers.distributed import shard_inplace
from mlx_lm.models.switch_layers import SwitchGLU, SwitchLinear

from ..config import ModelArgs
from .layers import DenseMLP, swiglu_oai


_GATHER_MM_DTYPES: dict = {}


def gather_mm_supports(dtype) -> bool:
    """Whether the default device's `gather_mm` takes `dtype` (MLX's CPU backend takes only
    float32 in 0.32; Metal takes bf16/fp16). Probed once per device and dtype on a 1x1 case."""
    key = (str(mx.default_device()), dtype)
    if key not in _GATHER_MM_DTYPES:
        try:
            one = mx.ones((1, 1, 1), dtype=dtype)
            mx.eval(mx.gather_mm(one, one, rhs_indices=mx.array([0], dtype=mx.uint32)))
            _GATHER_MM_DTYPES[key] = True
        except (RuntimeError, ValueError):
            _GATHER_MM_DTYPES[key] = False
    return _GATHER_MM_DTYPES[key]


class ExpertLinear(SwitchLinear):
    """mlx-lm's SwitchLinear that runs in float32 where the backend has no bf16/fp16 `gather_mm`.

    Without this an unquantised bf16 model (or the layers a quantised one leaves
    unquantised) stops with "[GatherMM::eval] Currently only supports float32" on Linux.
    Upcasting the expert weights costs a float32 copy of them per call, which is why it is
    done only where the backend needs it; quantised experts (gather_qmm) never come here.
    """

    def __call__(self, x, indices, sorted_indices=False):
        dtype = self["weight"].dtype
        if dtype == mx.float32 or gather_mm_supports(dtype):
            return super().__call__(x, indices, sorted_indices=sorted_indices)
        y = mx.gather_mm(x.astype(mx.float32), self["weight"].astype(mx.float32).swapaxes(-1, -2),
                         rhs_indices=indices, sorted_indices=sorted_indices)
        return y.astype(x.dtype)


class Router(nn.Module):
    """Chooses top-k experts on sigmoid(score) + bias; weighs them by the unbiased scores.

    A plain Module rather than nn.Linear so that quantising the model never touches it:
    routing decisions flip on small weight errors, and the router is tiny.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.weight = mx.zeros((args.num_local_experts, args.hidden_size))
        self.e_score_correction_bias = mx.zeros((args.num_local_experts,))
        self.top_k = args.num_experts_per_tok

    def __call__(self, x: mx.array):
        return self.route(x.astype(self.weight.dtype) @ self.weight.T)

    def route(self, logits: mx.array):
        scores = mx.sigmoid(logits.astype(mx.float32))
        biased = scores + self.e_score_correction_bias.astype(mx.float32)
        k = self.top_k
        inds = mx.stop_gradient(mx.argpartition(-biased, kth=k - 1, axis=-1)[..., :k])
        weights = mx.take_along_axis(scores, inds, axis=-1)
        weights = weights / weights.sum(axis=-1, keepdims=True)
        return inds, weights

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine"):
        """For folders whose converter quantized the router (mlx-lm's and mlx-vlm's ports write
        it 8-bit affine): it then runs as written. This package's recipes never quantize it
        (Model.quant_predicate leaves Routers out)."""
        return QuantizedRouter(self, group_size, bits, mode)


class QuantizedRouter(Router):
    """The router over a quantized weight (as nn.QuantizedLinear holds one); same routing."""

    def __init__(self, router: Router, group_size: int, bits: int, mode: str):
        nn.Module.__init__(self)
        self.top_k = router.top_k
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self.weight, self.scales, *biases = mx.quantize(router.weight, group_size, bits, mode=mode)
        if biases:
            self.biases = biases[0]
        self.e_score_correction_bias = router.e_score_correction_bias
        self.freeze()

    def __call__(self, x: mx.array):
        logits = mx.quantized_matmul(x.astype(self.scales.dtype) if self.mode == "affine" else x, self["weight"],
                                     self["scales"], self.get("biases"), transpose=True,
                                     group_size=self.group_size, bits=self.bits, mode=self.mode)
        return self.route(logits)


class SparseMoeBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate = Router(args)
        self.switch_mlp = SwitchGLU(
            args.hidden_size, args.intermediate_size, args.num_local_experts, activation=swiglu_oai(args)
        )
        for name in ("gate_proj", "up_proj", "down_proj"):
            old = getattr(self.switch_mlp, name)
            setattr(self.switch_mlp, name, ExpertLinear(old.input_dims, old.output_dims, old.num_experts, bias=False))
        gather_mm_supports(mx.bfloat16)  # probe outside any compiled graph
        gather_mm_supports(mx.float16)
        self.shared_experts = DenseMLP(args, args.shared_intermediate_size)
        self.routed_scaling_factor = args.routed_scaling_factor
        self.streamed = None  # set by stream(): the experts live on disk, a few in memory
        self.trace = None  # set by Model.record_experts: called with the router's choices

    def __call__(self, x: mx.array) -> mx.array:
        inds, weights = self.gate(x)
        if self.trace is not None:
            self.trace(inds)
        y = self.switch_mlp(x, inds) if self.streamed is None else self.streamed(self.switch_mlp, x, inds)
        # Weights stay float32 until after the sum, as in the reference.
        y = (y * weights[..., None]).sum(axis=-2) * self.routed_scaling_factor
        return y.astype(x.dtype) + self.shared_experts(x)

    def stream(self, experts) -> None:
        """Hold only `experts.n_slots` routed experts (experts.LayerExperts reads the rest from
        disk on demand): the SwitchGLU keeps its structure and quantisation, with one row per
        slot instead of one per expert."""
        pool = experts.empty_pool()
        own = dict(tree_flatten(self.switch_mlp.parameters()))
        if set(pool) != set(own):
            raise ValueError(f"streamed experts hold {sorted(pool)}, the layer has {sorted(own)}")
        for k, a in pool.items():
            if a.shape[1:] != own[k].shape[1:]:  # the dtype is the file's, as when loading
                raise ValueError(f"switch_mlp.{k}: stored {list(a.shape[1:])} per expert, "
                                 f"the layer has {list(own[k].shape[1:])}")
        self.switch_mlp.update(tree_unflatten(list(pool.items())))
        mx.eval(self.switch_mlp.parameters())
        experts.bind(self.switch_mlp)
        self.streamed = experts

    def shard(self, group) -> None:
        """Keep every routed expert's and the shared expert's slice of the intermediate
        dimension; the router stays whole. The output is then this rank's partial sum."""
        shard_inplace(self.switch_mlp.gate_proj, "all-to-sharded", group=group)
        shard_inplace(self.switch_mlp.up_proj, "all-to-sharded", group=group)
        shard_inplace(self.switch_mlp.down_proj, "sharded-to-all", group=group)
        self.shared_experts.shard(group)
