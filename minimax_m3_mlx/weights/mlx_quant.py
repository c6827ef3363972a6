"""An MLX-quantized module's (group size, bits, mode), read back from its tensors.

mlx-lm's and mlx-vlm's converters record per-module choices in the `quantization` block
in their own module names, sometimes without a group size (`mixed_3_6` writes
`"group_size": null`) or a mode (the router's `{"group_size": 64, "bits": 8}`). The
tensors say it exactly, whatever the names: bits from the packed words per input
element, the group size from the scales per row, the mode from the scales' dtype (only
affine keeps float scales; each microscaling mode allows one (bits, group) pair). So the
loader builds each module from its own tensors (as mlx-lm 0.32's loader does for modules
its config does not name) and nothing is dequantized or re-quantized.
"""

from __future__ import annotations

from typing import Dict, Mapping

import mlx.core as mx

from ..io import CheckpointError

# (bits, group size) -> mode for the scale-as-uint8 modes (MLX's mx.quantize).
_MICROSCALING = {(4, 16): "nvfp4", (4, 32): "mxfp4", (8, 32): "mxfp8"}
AFFINE_BITS = (2, 3, 4, 5, 6, 8)


def infer_quantization(path: str, in_dims: int, weights: Mapping[str, mx.array]) -> Dict[str, object]:
    """to_quantized's keyword arguments for the module at `path` (our names) whose unquantized
    weight has `in_dims` input elements, from `{path}.weight` / `.scales` (/ `.global_scale`)."""
    w, s = weights[f"{path}.weight"], weights[f"{path}.scales"]
    if w.dtype != mx.uint32 or s.shape[-1] == 0 or in_dims % s.shape[-1] or (w.shape[-1] * 32) % in_dims:
        raise CheckpointError(f"{path}: quantized weight {tuple(w.shape)} {w.dtype} with scales {tuple(s.shape)} "
                              f"does not pack the {in_dims} input elements per row the model expects "
                              f"(config.json does not match the weights)")
    group_size, bits = in_dims // s.shape[-1], w.shape[-1] * 32 // in_dims
    if s.dtype != mx.uint8:
        if f"{path}.biases" not in weights:
            raise CheckpointError(f"{path}: affine quantization (float scales) needs biases, and the folder has none")
        if bits not in AFFINE_BITS:
            raise CheckpointError(f"{path}: {bits}-bit affine quantization; MLX packs {AFFINE_BITS} bits")
        return {"group_size": group_size, "bits": bits, "mode": "affine"}
    mode = _MICROSCALING.get((bits, group_size))
    if mode is None:
        raise CheckpointError(f"{path}: uint8 scales with {bits} bits in groups of {group_size} are none of "
                              f"MLX's nvfp4 (4/16), mxfp4 (4/32) or mxfp8 (8/32)")
    params: Dict[str, object] = {"group_size": group_size, "bits": bits, "mode": mode}
    if f"{path}.global_scale" in weights:
        params["global_scale"] = True  # mlx-lm's nvfp4 experts with one tensor scale each
    return params


def describe(specs: Mapping[str, Mapping[str, object]]) -> str:
    """A short summary of per-module specs: `affine 4-bit g64 x 20, mxfp8 g32 x 12`."""
    counts: Dict[str, int] = {}
    for p in specs.values():
        mode = p["mode"]
        key = f"{p['bits']}-bit affine g{p['group_size']}" if mode == "affine" else f"{mode}"
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k} x{n}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "unquantized"
