"""Safetensors I/O: the one place that parses a header, locates tensors and reads their bytes.

`dtypes` is the one dtype table; `reader` locates and reads (whole folders through MLX's lazy
loader, or byte ranges for streaming conversion and per-rank loading); `writer` lays out and
writes files. Errors about files and tensors are `CheckpointError`s naming the file.
"""

from .reader import CheckpointError

__all__ = ["CheckpointError"]
