"""Quantised sources: FP8 with 128x128 float scales (dequantised) and MXFP8 / FP8-ue8m0 (kept packed).

MXFP8 (`quant_method: mxfp8`, or `fp8` with `scale_fmt: ue8m0`) is e4m3 bytes with one E8M0
exponent per 1x32 tile: MLX's own `mxfp8` layout once the bytes are read as uint32, so those
layers stay packed (no dequantisation, no copy). FP8 with float32 `weight_scale_inv` per
128x128 block (DeepSeek style) is dequantised exactly per block, ragged edge blocks included.
"""

from __future__ import annotations

from typing import Dict, Tuple

import mlx.core as mx

from ..config import ModelArgs
from ..io import CheckpointError
from ..io.dtypes import float_dtype
from ..sizes import ceil_div

MX_BLOCK = 32
SUPPORTED_QUANT_METHODS = ("mxfp8", "fp8")
SCALE_SUFFIXES = (".weight_scale_inv", ".weight_scale")


def model_dtype(args: ModelArgs) -> mx.Dtype:
    return float_dtype(args.dtype)


def _e8m0_to_float(s: mx.array) -> mx.array:
    return mx.power(mx.array(2.0, mx.float32), s.astype(mx.float32) - 127.0)


def dequantize_fp8_blocks(w: mx.array, scale: mx.array, block: Tuple[int, int], name: str, dtype) -> mx.array:
    """w (e4m3 bytes, [..., out, in]) times one scale per (bo x bi) block, edge blocks ragged."""
    bo, bi = block
    out_dim, in_dim = w.shape[-2:]
    expect = (*w.shape[:-2], ceil_div(out_dim, bo), ceil_div(in_dim, bi))
    if tuple(scale.shape) != expect:
        raise CheckpointError(
            f"{name}: scale shape {tuple(scale.shape)} does not fit weight {tuple(w.shape)} "
            f"with {bo}x{bi} blocks (expected {expect})"
        )
    s = _e8m0_to_float(scale) if scale.dtype == mx.uint8 else scale.astype(mx.float32)
    s = mx.repeat(mx.repeat(s, bo, axis=-2), bi, axis=-1)[..., :out_dim, :in_dim]
    return (mx.from_fp8(w, mx.float32) * s).astype(dtype)


def quant_block(quantization_config: dict) -> Tuple[int, int]:
    """The (rows, columns) a source scale covers: `weight_block_size`, else MXFP8's 1x32 or FP8's 128x128."""
    qc = quantization_config or {}
    block = qc.get("weight_block_size") or ([1, MX_BLOCK] if qc.get("quant_method") == "mxfp8" else [128, 128])
    if len(block) != 2:
        raise CheckpointError(f"quantization_config.weight_block_size must have 2 entries, got {block}")
    return int(block[0]), int(block[1])


def unpack_quantized(args: ModelArgs, weights: Dict[str, mx.array]) -> Tuple[Dict[str, mx.array], set]:
    """Resolve `X.weight` + `X.weight_scale_inv` pairs: MX tiles stay packed, the rest dequantise.

    Returns the weights and the set of (source-named) module prefixes left as mxfp8
    (`X.weight` as uint32 words, `X.scales` the E8M0 bytes).
    """
    scale_keys = [k for k in weights if k.endswith(SCALE_SUFFIXES)]
    qc = args.quantization_config
    method = (qc or {}).get("quant_method")
    if qc is not None and args.quantization is None and method not in SUPPORTED_QUANT_METHODS:
        raise CheckpointError(
            f"unsupported quantization_config.quant_method {method!r}: supported are "
            f"{', '.join(SUPPORTED_QUANT_METHODS)} (and MLX's own 'quantization')"
        )
    if not scale_keys:
        return weights, set()
    if qc is None:
        raise CheckpointError(f"{scale_keys[0]}: a quantisation scale, but config.json has no quantization_config")
    block = quant_block(qc)
    dtype = model_dtype(args)
    out = dict(weights)
    mx_packed = set()
    for sk in scale_keys:
        base = sk.rsplit(".", 1)[0]
        wk = f"{base}.weight"
        if wk not in out:
            raise CheckpointError(f"{sk}: scale without its weight {wk}")
        w, s = out.pop(wk), out.pop(sk)
        if w.dtype != mx.uint8:
            raise CheckpointError(f"{wk}: expected float8_e4m3 bytes next to {sk}, got {w.dtype}")
        if s.dtype == mx.uint8 and block == (1, MX_BLOCK):
            expect = (*w.shape[:-1], w.shape[-1] // MX_BLOCK)
            if w.shape[-1] % MX_BLOCK or tuple(s.shape) != expect:
                raise CheckpointError(
                    f"{sk}: E8M0 scale shape {tuple(s.shape)} does not fit weight {tuple(w.shape)} "
                    f"with 1x{MX_BLOCK} tiles (expected {expect})"
                )
            # e4m3 bytes + E8M0 per 1x32 is MLX's mxfp8: reinterpret, do not convert.
            out[wk] = w.view(mx.uint32)
            out[f"{base}.scales"] = s
            mx_packed.add(base)
        else:
            out[wk] = dequantize_fp8_blocks(w, s, block, sk, dtype)
    stray = [k for k, v in out.items() if v.dtype == mx.uint8 and not k.endswith(".scales")]
    if stray:
        raise CheckpointError(f"{stray[0]}: float8 weight without a weight_scale_inv")
    return out, mx_packed


def dequantize_packed(weights: Dict[str, mx.array], packed: set, dtype) -> Dict[str, mx.array]:
    """The mxfp8-packed modules of `weights` (as unpack_quantized leaves them) back to floats."""
    out = dict(weights)
    for base in packed:
        w, s = out.pop(f"{base}.weight"), out.pop(f"{base}.scales")
        out[f"{base}.weight"] = mx.dequantize(w, s, group_size=MX_BLOCK, bits=8, mode="mxfp8").astype(dtype)
    return out
