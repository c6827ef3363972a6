"""Conversion: any released MiniMax-M3 checkpoint -> an MLX model, streamed in bounded memory.

How it works, and why:
- Plan first, from safetensors headers only. Every source tensor is located (file, byte
  offset); the tensors are cut into work items small enough to hold at once: one expert
  (original layout: its w1/w3/w2; transformers re-save: its slice of the fused
  [E, 2I, H] tensors), row blocks of big matrices (embeddings, lm_head, dense MLPs), or
  one small group (a weight with its scale). Each item goes through the same sanitize code the
  loader uses (weights/sanitize.py) on placeholder arrays, which gives the name,
  shape and row position of everything the item produces. Checked against the model's
  parameters before a byte is written: missing or extra tensors are errors.
- The output files are laid out from that plan (names, shapes, byte offsets) before any
  weight is read, so every result goes straight to its place in its shard: peak memory is
  one item plus a read-ahead of the next, whatever the model's size. Quantisation works
  row by row (groups run along the last axis), so quantising an expert alone and writing
  it at row e equals quantising the stacked tensor.
- FP8 / MXFP8 sources are dequantised (exactly, in float32) and quantised once to the
  target; an MXFP8 layer whose target is mxfp8 itself is copied packed, never re-rounded.
- Output goes to `.OUT.partial` beside OUT, renamed only when complete. A shard is
  recorded in the manifest (size, sha256) when finished; a rerun with the same plan
  verifies and keeps those and redoes the rest. An existing OUT is never replaced
  without --overwrite.
- The vision tower and projector are kept (their own work items, through the loader's
  vision sanitize: published or transformers names -> ours, FP8/MXFP8 dequantised), and
  config.json keeps vision_config and projector_hidden_size. Their Linear layers are
  8-bit affine by default or unquantised (--vision-bits 16), whatever the recipe gives the
  text; the patch embedding (a 5-D conv weight) and the LayerNorms are never quantised.
  --drop-vision writes a text-only model (no vision tensors, no vision_config), as does a
  source without vision tensors. Multi-token-prediction tensors are always skipped (unused).
- The output has mlx-lm's "quantization" config (per-module entries where a layer's spec
  differs from the commonest, e.g. the 8-bit vision layers) and a `model_file`
  that makes `mlx_lm.generate --trust-remote-code` build this package's Model. mlx-lm
  then insists on trust_remote_code for the folder; `mlx_lm.utils.load_model(path,
  get_model_classes=...)` needs `model_config={"model_file": None}` to take our classes.

Modules: plan.py (work items and output layout from the headers), writer.py (reading ahead,
encoding, shard files and manifest), run.py (one conversion end to end), recipes.py
(quantisation policies and sizes), cli.py (`minimax-m3 convert`).
"""

from .cli import main
from .run import MODEL_FILE, ConvertError, ConvertResult, convert
from .writer import MANIFEST

__all__ = ["convert", "main", "ConvertError", "ConvertResult", "MANIFEST", "MODEL_FILE"]
