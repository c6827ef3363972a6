"""Peak memory of `minimax-m3 convert` against the number of layers: it must not grow.

Writes synthetic checkpoints with the real model's layer widths (hidden 6144, 64/4 heads of
128, experts of 3072, dense MLP of 12288, index 4 x 128, vocab 200064) but fewer experts
and layers, in the official MXFP8 layout (e4m3 bytes + E8M0 scales; index projections,
router, embeddings and lm_head in BF16) or the BF16 original layout, then converts each
in a fresh process and reads that process's peak RSS (getrusage). The converter streams
one expert / row block at a time, so 2 and 4 input layers should peak at the same RSS.

    python scripts/bench_convert.py --work /tmp/bench --experts 16 --layers 2 4

Weight values are a repeated random pool (memory and I/O do not depend on values; the
pool keeps writing several GB fast).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

POOL = np.random.default_rng(0).integers(0, 256, 64 << 20, dtype=np.uint8)
# e4m3 bytes with the exponent kept small (no NaN 0x7f/0xff, values within +-1.75 * 2^-3)
FP8_POOL = (POOL & 0b10001111) | 0b00100000
BF16_POOL = (np.random.default_rng(1).normal(0, 0.02, 32 << 20).astype(np.float32).view(np.uint32) >> 16).astype(
    np.uint16).view(np.uint8)


def bench_config(n_layers: int, n_experts: int) -> dict:
    from minimax_m3_mlx.convert import recipes

    config = recipes.load_config(recipes.REAL_CONFIG)
    t = config["text_config"]
    freq = [0] + [1] * (n_layers - 1)  # layer 0 dense with full attention, as the real model's first layers
    t.update(num_hidden_layers=n_layers, num_local_experts=n_experts, moe_layer_freq=freq)
    t["sparse_attention_config"]["sparse_attention_freq"] = freq
    return config


def original_tensors(config: dict, layout: str) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """Published (original) names -> (shape, safetensors dtype) of the layout."""
    t = config["text_config"]
    H, nh, nkv, D = t["hidden_size"], t["num_attention_heads"], t["num_key_value_heads"], t["head_dim"]
    sac = t["sparse_attention_config"]
    ih, idim, E, I = sac["sparse_num_index_heads"], sac["sparse_index_dim"], t["num_local_experts"], t["intermediate_size"]
    S, Dn, V = t["shared_intermediate_size"], t["dense_intermediate_size"], t["vocab_size"]
    mx8 = layout == "mxfp8"
    out: Dict[str, Tuple[Tuple[int, ...], str]] = {}

    def linear(name, o, i, quantised=True):
        if mx8 and quantised:
            out[f"{name}.weight"] = ((o, i), "F8_E4M3")
            out[f"{name}.weight_scale_inv"] = ((o, i // 32), "U8")
        else:
            out[f"{name}.weight"] = ((o, i), "BF16")

    p = "language_model.model."
    out[f"{p}embed_tokens.weight"] = ((V, H), "BF16")
    out[f"{p}norm.weight"] = ((H,), "BF16")
    out["language_model.lm_head.weight"] = ((V, H), "BF16")
    for n in range(t["num_hidden_layers"]):
        L = f"{p}layers.{n}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[f"{L}{norm}.weight"] = ((H,), "BF16")
        for proj, o, i in (("q", nh * D, H), ("k", nkv * D, H), ("v", nkv * D, H), ("o", H, nh * D)):
            linear(f"{L}self_attn.{proj}_proj", o, i)
        out[f"{L}self_attn.q_norm.weight"] = ((D,), "BF16")
        out[f"{L}self_attn.k_norm.weight"] = ((D,), "BF16")
        if sac["sparse_attention_freq"][n]:
            linear(f"{L}self_attn.index_q_proj", ih * idim, H, quantised=False)
            linear(f"{L}self_attn.index_k_proj", idim, H, quantised=False)
            out[f"{L}self_attn.index_q_norm.weight"] = ((idim,), "BF16")
            out[f"{L}self_attn.index_k_norm.weight"] = ((idim,), "BF16")
        if t["moe_layer_freq"][n]:
            m = f"{L}block_sparse_moe."
            out[f"{m}gate.weight"] = ((E, H), "BF16")
            out[f"{m}e_score_correction_bias"] = ((E,), "F32")
            for e in range(E):
                linear(f"{m}experts.{e}.w1", I, H)
                linear(f"{m}experts.{e}.w3", I, H)
                linear(f"{m}experts.{e}.w2", H, I)
            for proj, o, i in (("gate", S, H), ("up", S, H), ("down", H, S)):
                linear(f"{m}shared_experts.{proj}_proj", o, i)
        else:
            for proj, o, i in (("gate", Dn, H), ("up", Dn, H), ("down", H, Dn)):
                linear(f"{L}mlp.{proj}_proj", o, i)
    return out


_SIZES = {"BF16": 2, "F32": 4, "F8_E4M3": 1, "U8": 1}


def _fill(f, nbytes: int, tag: str, seed: int) -> None:
    """Write nbytes of plausible values for the dtype from the random pools."""
    pool = {"F8_E4M3": FP8_POOL, "BF16": BF16_POOL}.get(tag)
    if tag == "U8":  # E8M0 scales around 2^-3
        pool = np.full(1 << 20, 124, np.uint8)
    if tag == "F32":
        pool = np.random.default_rng(seed).normal(0, 0.1, 1 << 18).astype(np.float32).view(np.uint8)
    start = (seed * 7919 * 64) % (len(pool) // 2)
    start -= start % 8
    while nbytes:
        n = min(nbytes, len(pool) - start)
        f.write(pool[start:start + n].tobytes())
        nbytes -= n
        start = 0


def write_checkpoint(path: Path, config: dict, layout: str, shard_bytes: int = 2 << 30, sparse: bool = False) -> int:
    """Stream a sharded checkpoint to disk (header first, then data); returns its bytes.

    sparse: headers only, the data left as holes (files of the full size, zeros, no disk used).
    """
    from minimax_m3_mlx.synthetic import write_tiny_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    tensors = original_tensors(config, layout)
    shards: List[List[str]] = [[]]
    size = 0
    for name in sorted(tensors):
        nbytes = int(np.prod(tensors[name][0])) * _SIZES[tensors[name][1]]
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map, total = {}, 0
    for k, names in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in names:
            shape, tag = tensors[name]
            nbytes = int(np.prod(shape)) * _SIZES[tag]
            header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = fname
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(path / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            if sparse:
                f.truncate(8 + len(raw) + offset)
            for i, name in enumerate(names if not sparse else []):
                shape, tag = tensors[name]
                _fill(f, int(np.prod(shape)) * _SIZES[tag], tag, i)
        total += offset
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    if layout == "mxfp8":
        config = dict(config, quantization_config={
            "quant_method": "mxfp8", "weight_block_size": [1, 32],
            "ignored_layers": ["language_model.lm_head", "language_model.model.embed_tokens", "vision_tower"]})
    (path / "config.json").write_text(json.dumps(config, indent=1))
    write_tiny_tokenizer(path, {"text_config": {"vocab_size": 0}})
    return total


def child(src: str, out: str, flags: List[str]) -> None:
    """Run one conversion in this (fresh) process and print its figures as JSON."""
    from minimax_m3_mlx.convert import convert
    from minimax_m3_mlx.convert.cli import build_parser

    opts = build_parser().parse_args(["--hf-path", src, "--mlx-path", out, "--no-progress", *flags])
    t0 = time.time()
    r = convert(opts.hf_path, opts.mlx_path, quantize=opts.quantize, q_bits=opts.q_bits,
                q_group_size=opts.q_group_size, q_mode=opts.q_mode, recipe=opts.recipe, progress=False,
                log=lambda *a: print(*a, file=sys.stderr))
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peak = peak_kb if sys.platform == "darwin" else peak_kb * 1024
    import mlx.core as mx

    print(json.dumps({"peak_rss": peak, "seconds": time.time() - t0, "out_bytes": r.file_bytes,
                      "bits_per_weight": r.bits_per_weight, "mlx_peak": mx.get_peak_memory(),
                      "mlx_cache": mx.get_cache_memory()}))


def plan_real(work: Path, recipe: str = "mac-256gb") -> None:
    """Plan the conversion of the full MXFP8 release (60 layers, 128 experts) from headers alone."""
    from minimax_m3_mlx.convert import plan as convert_plan, recipes

    config = recipes.load_config(recipes.REAL_CONFIG)
    src = work / "sparse-real-mxfp8"
    nbytes = write_checkpoint(src, config, "mxfp8", shard_bytes=5 << 30, sparse=True)
    config = json.loads((src / "config.json").read_text())
    t0 = time.time()
    plan = convert_plan.plan_conversion(src, config, recipes.RECIPES[recipe], "bfloat16", 5 << 30)
    seconds = time.time() - t0
    # the synthetic release holds no vision tensors, so its conversion is text-only
    est = recipes.estimate_size(config, recipes.RECIPES[recipe], "bfloat16", vision=False)
    planned = sum(s.size for s in plan.shards)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    print(f"full MXFP8 release ({nbytes / 1e9:.0f} GB, headers only): planned {len(plan.items)} work items, "
          f"{len(plan.files)} output tensors in {len(plan.shards)} shards of {recipe}, {planned / 1e9:.2f} GB "
          f"(--list-recipes --drop-vision estimate {est.file_bytes / 1e9:.2f} GB) in {seconds:.1f} s; process peak RSS "
          f"{peak / 2**30:.2f} GiB")
    shutil.rmtree(src)


def measure(src: Path, out: Path, flags: List[str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, __file__, "--child", str(src), str(out), *flags]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        raise RuntimeError(f"conversion failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/bench_convert", help="scratch folder (checkpoints + outputs)")
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--layout", default="mxfp8", choices=["mxfp8", "original"])
    ap.add_argument("--flags", default="-q --q-bits 4", help="convert flags (quoted)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints and outputs")
    ap.add_argument("--plan-real", action="store_true",
                    help="only plan the full-size MXFP8 release from a header-only (sparse) checkpoint")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.child:
        child(args.child[0], args.child[1], rest)
        return
    work = Path(args.work)
    if args.plan_real:
        plan_real(work)
        return
    rows = []
    for n in args.layers:
        src, out = work / f"src-{args.layout}-{n}L", work / f"out-{n}L"
        t0 = time.time()
        src_bytes = write_checkpoint(src, bench_config(n, args.experts), args.layout)
        t_write = time.time() - t0
        r = measure(src, out, args.flags.split())
        rows.append((n, src_bytes, r))
        print(f"{n} layers: source {src_bytes / 1e9:.2f} GB (written in {t_write:.0f} s), output "
              f"{r['out_bytes'] / 1e9:.2f} GB at {r['bits_per_weight']:.2f} bits/weight, peak RSS "
              f"{r['peak_rss'] / 2**30:.2f} GiB (MLX peak {r['mlx_peak'] / 2**30:.2f} GiB, cache at the end "
              f"{r['mlx_cache'] / 2**20:.0f} MiB), {r['seconds']:.0f} s "
              f"({src_bytes / r['seconds'] / 1e6:.0f} MB/s of source)", flush=True)
        if not args.keep:
            shutil.rmtree(src)
            shutil.rmtree(out)
    print("\n| input layers | source | output | bits/weight | peak RSS | time |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n, src_bytes, r in rows:
        print(f"| {n} | {src_bytes / 1e9:.2f} GB | {r['out_bytes'] / 1e9:.2f} GB | {r['bits_per_weight']:.2f} | "
              f"{r['peak_rss'] / 2**30:.2f} GiB | {r['seconds']:.0f} s |")
    print(f"\nmachine: {platform.platform()}, {os.cpu_count()} cores; layout {args.layout}, "
          f"{args.experts} experts per MoE layer; flags: {args.flags}")


if __name__ == "__main__":
    main()
