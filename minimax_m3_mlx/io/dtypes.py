"""The one dtype table: safetensors tags, the numpy dtype their bytes are read as, the MLX dtype.

numpy has no bfloat16 or float8: BF16 bytes are read as uint16 and viewed as bfloat16 in
MLX; float8 stays uint8 bytes, as `mx.load` gives it (the weights layer interprets them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx
import numpy as np


@dataclass(frozen=True)
class DType:
    tag: str  # safetensors' name
    numpy: type  # what the bytes are read as
    mlx: mx.Dtype  # the array MLX makes of them

    @property
    def itemsize(self) -> int:
        return np.dtype(self.numpy).itemsize


DTYPES = {d.tag: d for d in (
    DType("F32", np.float32, mx.float32),
    DType("F16", np.float16, mx.float16),
    DType("BF16", np.uint16, mx.bfloat16),
    DType("F8_E4M3", np.uint8, mx.uint8),
    DType("U8", np.uint8, mx.uint8),
    DType("U32", np.uint32, mx.uint32),
    DType("I32", np.int32, mx.int32),
)}
# The tag MLX arrays are written with (float8 never occurs: MLX keeps it as uint8).
_TAG_OF = {d.mlx: d.tag for d in DTYPES.values() if d.tag != "F8_E4M3"}
# A config's float dtype name -> tag.
FLOAT_TAGS = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def tag_of(dtype: mx.Dtype) -> str:
    return _TAG_OF[dtype]


def float_dtype(name: str, default: mx.Dtype = mx.bfloat16) -> mx.Dtype:
    """The MLX dtype of a config's float dtype name ("bfloat16", ...); `default` for others."""
    tag = FLOAT_TAGS.get(name)
    return DTYPES[tag].mlx if tag else default


def nbytes(shape: Sequence[int], tag: str) -> int:
    n = DTYPES[tag].itemsize
    for d in shape:
        n *= int(d)
    return n

