"""`minimax-m3 convert`: the command line of the converter (see the package docstring)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..arg_types import ArgumentParser, positive_float, positive_int
from ..io.dtypes import FLOAT_TAGS
from . import recipes
from .recipes import PolicyError
from .run import DEFAULT_SHARD_GB, ConvertError, convert, read_source_config, resolve_source


# -- command line -------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="minimax-m3 convert",
        description="Convert a released MiniMax-M3 checkpoint (BF16, transformers re-save, MXFP8, FP8) to MLX, "
                    "streaming one expert or row block at a time.")
    p.add_argument("--hf-path", "--model", help="checkpoint folder, or a Hugging Face repo id to download")
    p.add_argument("--mlx-path", default="mlx_model", help="output folder (default: mlx_model)")
    p.add_argument("-q", "--quantize", action="store_true",
                   help="quantise every layer but the router (the vision tower: see --vision-bits)")
    p.add_argument("--q-bits", type=positive_int, default=None, help="bits per weight (default: 4, mxfp8: 8)")
    p.add_argument("--q-group-size", type=positive_int, default=None,
                   help="group size (default: affine 64, mxfp4/mxfp8 32, nvfp4 16); also applies to --recipe")
    p.add_argument("--q-mode", default="affine", choices=list(recipes.MODE_DEFAULTS), help="quantisation mode")
    p.add_argument("--dtype", default=None, choices=list(FLOAT_TAGS),
                   help="dtype of unquantised tensors and affine scales (default: the config's)")
    p.add_argument("--recipe", default=None, choices=list(recipes.RECIPES), help="mixed-precision recipe")
    p.add_argument("--vision-bits", type=int, default=None, choices=list(recipes.VISION_BITS),
                   help="the vision tower's Linear layers when quantising: 8 = 8-bit affine (default), "
                        "16 = unquantised in --dtype; its patch embedding and LayerNorms are never quantised")
    p.add_argument("--drop-vision", action="store_true",
                   help="leave the vision tower out: a text-only model (no vision_config in its config)")
    p.add_argument("--list-recipes", action="store_true",
                   help="print each recipe's size for the real model (or for --hf-path's config) and exit")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --mlx-path")
    p.add_argument("--revision", default=None, help="repo revision to download")
    p.add_argument("--shard-size-gb", type=positive_float, default=DEFAULT_SHARD_GB, help="output shard size (GiB)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--tokenizer", default=None,
                   help="take the tokenizer files from this folder (for a source that has none)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Errors (ConvertError and the rest) and Ctrl-C are reported by cli.main as one line."""
    parser = build_parser()
    opts = parser.parse_args(argv)
    if opts.list_recipes:
        print(list_recipes(opts.hf_path, opts.dtype, opts.q_group_size, opts.vision_bits, opts.drop_vision))
        return 0
    if not opts.hf_path:
        parser.error("--hf-path is required")
    convert(opts.hf_path, opts.mlx_path, quantize=opts.quantize, q_bits=opts.q_bits,
            q_group_size=opts.q_group_size, q_mode=opts.q_mode, dtype=opts.dtype, recipe=opts.recipe,
            overwrite=opts.overwrite, revision=opts.revision,
            shard_bytes=max(1, int(opts.shard_size_gb * (1 << 30))), progress=not opts.no_progress,
            vision_bits=opts.vision_bits, drop_vision=opts.drop_vision, tokenizer=opts.tokenizer)
    return 0


def list_recipes(hf_path: Optional[str], dtype: Optional[str], group_size: Optional[int],
                 vision_bits: Optional[int] = None, drop_vision: bool = False) -> str:
    if hf_path:  # a repo id: its config.json alone is enough
        config = read_source_config(resolve_source(hf_path, allow_patterns=["config.json"]))
        what = f"the model at {hf_path}"
    else:
        config = recipes.load_config(recipes.REAL_CONFIG)
        what = "MiniMax-M3 (428B; configs/minimax_m3.json)"
    try:
        table = recipes.format_recipes(config, dtype, group_size, vision_bits, drop_vision)
    except PolicyError as e:
        raise ConvertError(str(e)) from None
    return f"Recipes, sized for {what}:\n" + table


if __name__ == "__main__":
    sys.exit(main())
