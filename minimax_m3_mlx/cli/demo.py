"""`minimax-m3 demo`: the whole path on a tiny random model, with no network.

Writes a tiny random checkpoint in the official MXFP8 layout (e4m3 weights, E8M0 scales
per 1x32, index projections / router / embeddings / lm_head unquantised) to a temporary
folder, loads it as a user would load the real one, and generates with mlx-lm's
generation loop, long enough that sparse attention drops blocks. The text is noise (the
weights are random); the point is that every stage runs and reports its speed.

The demo model has a random vision tower too, and heads of 64 (the tests' tiny models
have 32), so a kept folder (--keep) also takes `generate --kv-bits 4` (the default cache
group of 64 divides its heads) and `generate --image`.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import stream_generate

from .. import synthetic
from ..arg_types import ArgumentParser, positive_int, seed
from ..loading import load
from ..serving.generate import reply_room
from ..sizes import ceil_div

# Heads of 64 (and rotary dims to match): the --kv-bits default group size of 64 must divide them.
DEMO_TEXT = {"head_dim": 64, "rotary_dim": 32, "sparse_attention_config": {"sparse_index_dim": 64}}


def demo_checkpoint(seed: int):
    """(config, weights) of the demo model: the tests' tiny model with wider heads and a vision tower."""
    config = synthetic.tiny_config(DEMO_TEXT)
    return config, {**synthetic.random_weights(config, seed=seed), **synthetic.random_vision_weights(config, seed)}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="minimax-m3 demo", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layout", default="mxfp8", choices=synthetic.LAYOUTS, help="checkpoint layout to write")
    p.add_argument("--max-tokens", type=positive_int, default=48, help="most tokens to generate (default 48)")
    p.add_argument("--prompt", default="Tell me about sparse attention.", help="the message to the model")
    p.add_argument("--seed", type=seed, default=0, help="seed of the random weights and of sampling (default 0)")
    p.add_argument("--keep", default=None, help="write the checkpoint here and keep it (a new or empty folder)")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.keep:  # never write over another model's files
        keep = Path(args.keep)
        if keep.exists() and (not keep.is_dir() or any(keep.iterdir())):
            p.error(f"--keep {keep}: " + ("not empty; choose a new or empty folder" if keep.is_dir() else
                                          "a file; choose a new or empty folder"))

    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="minimax-m3-demo-"))
    try:
        t0 = time.perf_counter()
        config, weights = demo_checkpoint(args.seed)
        synthetic.write_checkpoint(folder, config, weights, args.layout)
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        print(f"wrote a tiny random {args.layout} checkpoint ({size / 1e6:.1f} MB) to {folder} "
              f"in {time.perf_counter() - t0:.2f}s")

        t0 = time.perf_counter()
        model, tokenizer = load(folder)
        text = config["text_config"]
        sac = text["sparse_attention_config"]
        print(f"loaded in {time.perf_counter() - t0:.2f}s: {text['num_hidden_layers']} layers "
              f"({sum(text['moe_layer_freq'])} MoE, {sum(sac['sparse_attention_freq'])} with sparse attention: "
              f"blocks of {sac['sparse_block_size']}, top-{sac['sparse_topk_blocks']})")

        messages = [{"role": "user", "content": args.prompt}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        mx.random.seed(args.seed)
        print("--- generated (random weights: noise) ---")
        last = None
        max_tokens = min(args.max_tokens, reply_room(model, len(prompt)))  # the tiny model's context is short
        if max_tokens < args.max_tokens:
            print(f"(--max-tokens {args.max_tokens} is past the context: generating {max_tokens})")
        for last in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
            print(last.text, end="", flush=True)
        print("\n---")
        if last is not None:
            print(f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tokens/s")
            print(f"generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s")
            print(f"peak memory: {last.peak_memory:.3f} GB")
            blocks = ceil_div(last.prompt_tokens + last.generation_tokens, sac["sparse_block_size"])
            print(f"context at the end: {blocks} blocks, of which each query kept {sac['sparse_topk_blocks']}")
        if args.keep:
            print(f"try: minimax-m3 generate --model {folder} --kv-bits 4; "
                  f"minimax-m3 generate --model {folder} --image photo.jpg")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
