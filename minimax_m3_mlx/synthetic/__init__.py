"""Tiny random MiniMax-M3 checkpoints in every released layout, with a tiny tokenizer (tests, demo).

Nothing here may download weights. Sits on the io and weights layers only: it writes what
the releases hold, never through the model.
"""

from ..io.writer import write_safetensors
from .checkpoints import (
    LAYOUTS, TINY_TEXT, TINY_VISION, bfloat16_bits, from_original_names, layout_tensors, quantize_fp8_blocks,
    quantize_mxfp8, random_vision_weights, random_weights, resave_config, round_to_dtype, text_shapes, tiny_config,
    to_original_names, vision_shapes,
    write_checkpoint,
)
from .tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, write_tiny_tokenizer

__all__ = [
    "LAYOUTS", "TINY_TEXT", "TINY_VISION", "from_original_names", "layout_tensors", "quantize_fp8_blocks",
    "quantize_mxfp8", "random_vision_weights", "random_weights", "resave_config", "text_shapes", "tiny_config",
    "to_original_names", "vision_shapes",
    "write_checkpoint", "write_safetensors", "bfloat16_bits", "round_to_dtype", "CHAT_TEMPLATE", "SPECIAL_TOKENS", "write_tiny_tokenizer",
]
