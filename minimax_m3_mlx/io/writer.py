"""Writing safetensors files: headers laid out in advance, and whole files from numpy arrays."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence, Tuple

import numpy as np

from .dtypes import DTYPES


def encode_header(entries: Iterable[Tuple[str, str, Sequence[int], int, int]],
                  metadata: Optional[dict] = None) -> bytes:
    """The JSON header for (name, tag, shape, start, end) entries, padded to 8 bytes as safetensors does."""
    header = {} if metadata is None else {"__metadata__": metadata}
    for name, tag, shape, start, end in entries:
        header[name] = {"dtype": tag, "shape": [int(d) for d in shape], "data_offsets": [start, end]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


def length_prefix(header: bytes) -> bytes:
    return struct.pack("<Q", len(header))


def write_safetensors(path: Path, tensors: Dict[str, Tuple[np.ndarray, str]], metadata: Optional[dict] = None):
    """A safetensors file with explicit dtype tags (numpy has no float8 or bfloat16)."""
    entries, blobs, offset = [], [], 0
    for name, (arr, tag) in tensors.items():
        data = np.ascontiguousarray(arr.astype(DTYPES[tag].numpy, copy=False)).tobytes()
        entries.append((name, tag, arr.shape, offset, offset + len(data)))
        offset += len(data)
        blobs.append(data)
    header = encode_header(entries, metadata)
    with open(path, "wb") as f:
        f.write(length_prefix(header) + header)
        for b in blobs:
            f.write(b)
