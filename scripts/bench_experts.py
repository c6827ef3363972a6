"""--expert-memory at the real widths: hits, misses, bytes read, tok/s against what the disk allows.

The model is N MoE layers of the real config (hidden 6144, 128 experts of 3 x 3072x6144
per layer, top-4, sparse attention), 4-bit affine (group 64, bf16 scales) with random
weights, written as `convert` writes a folder: config.json with mlx-lm's "quantization",
the experts stacked per layer ([128, out, in] words, scales and biases), one shard per
layer. The vocabulary is cut to 8192 (the head is not what is measured).

Each budget (a fraction of the expert bank) and routing runs in its own process (for its
peak RSS), after the bank's pages are dropped from the page cache (posix_fadvise
DONTNEED), and every expert read drops its pages again, so every miss is read from the disk:

  decode        `--decode` random tokens one at a time after a 16-token prompt
  prefill       one chunk of `--chunk` tokens through a fresh cache
  disk GB/s     measured in the same process: one sequential read of `--disk-probe` bytes
                and expert-sized reads at random experts (the prediction uses the latter)
  predicted     disk-bound tok/s: expert-read speed / miss bytes per token
  routing       uniform: random router weights; zipf: a router bias falling as 1/rank over
                a random order of the experts (skewed, as real routing is)

  python scripts/bench_experts.py --folder /tmp/bank --layers 4 --json out.json
  python scripts/bench_experts.py --folder /tmp/bank --clean   # delete the folder afterwards
  python scripts/bench_experts.py --folder /tmp/bank --page-cache --chunk 0   # no disk: the streaming's own cost
  python scripts/bench_experts.py --folder /tmp/bank --trace /tmp/tr   # also /tmp/tr-uniform.npz, /tmp/tr-zipf.npz
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import bench_decode as bd  # noqa: E402

from minimax_m3_mlx import load_model  # noqa: E402
from minimax_m3_mlx.config import ModelArgs  # noqa: E402
from minimax_m3_mlx.io.dtypes import tag_of  # noqa: E402
from minimax_m3_mlx.io.reader import INDEX, RangeReader, StoredTensor, locate  # noqa: E402
from minimax_m3_mlx.io.writer import encode_header, length_prefix, write_safetensors  # noqa: E402
from minimax_m3_mlx.model import Model  # noqa: E402
from minimax_m3_mlx.model import experts  # noqa: E402
from minimax_m3_mlx.model.expert_trace import ExpertTrace  # noqa: E402
from minimax_m3_mlx.model.experts import EXPERTS, PIECE, READ_THREADS  # noqa: E402
from minimax_m3_mlx.parallel.sizing import cache_bytes  # noqa: E402

VOCAB = 8192


# -- the folder ------------------------------------------------------------------------------------------
def _numpy(a: mx.array):
    tag = tag_of(a.dtype)
    return (np.array(a.view(mx.uint16)) if a.dtype == mx.bfloat16 else np.array(a)), tag


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def write_experts(path: Path, shapes: dict, rng, chunk: int = 8) -> None:
    """One layer's stacked expert tensors, written a few experts at a time (the bank is far
    larger than what this machine should hold): random 4-bit words, scales near
    1/(16 sqrt(in)), biases centring the values, as bench_decode randomises them."""
    entries, offset = [], 0
    for name, (shape, tag) in shapes.items():
        n = int(np.prod(shape)) * (4 if tag == "U32" else 2)
        entries.append((name, tag, shape, offset, offset + n))
        offset += n
    header = encode_header(entries)
    with open(path, "wb") as f:
        f.write(length_prefix(header) + header)
        for name, (shape, tag) in shapes.items():
            for a in range(0, shape[0], chunk):
                part = (min(chunk, shape[0] - a), *shape[1:])
                if tag == "U32":
                    f.write(rng.integers(0, 1 << 32, part, dtype=np.uint32).tobytes())
                    continue
                n_in = shapes[name.rsplit(".", 1)[0] + ".weight"][0][-1] * 8
                scale = rng.uniform(0.5, 1.5, part).astype(np.float32) / (16 * n_in**0.5)
                f.write(_bf16_bits(scale if name.endswith(".scales") else -7.5 * scale).tobytes())


def write_folder(folder: Path, n_layers: int) -> None:
    cfg = bd.text_config(n_layers, tiny=False, n_dense=0)
    cfg["vocab_size"] = VOCAB
    cfg["max_position_embeddings"] = 1 << 16
    config = {"model_type": "minimax_m3_vl", "text_config": cfg, "quantization": {"group_size": 64, "bits": 4}}
    model = Model(ModelArgs.from_dict(config))
    model.set_dtype(mx.bfloat16)
    keep = model.cast_predicate
    model.update(tree_unflatten([(k, v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())
                                 if not keep(k)]))
    nn.quantize(model, group_size=64, bits=4, class_predicate=bd.quant_predicate("q4", "ours", model))
    mx.random.seed(0)
    folder.mkdir(parents=True)
    for path, m in model.named_modules():
        if EXPERTS[:-1] in f".{path}." or path.endswith(".gate"):  # experts: below; routers: one_run
            continue
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            bd._randomize_quantized(m, mx.bfloat16)
        elif isinstance(m.get("weight"), mx.array) and mx.issubdtype(m.weight.dtype, mx.floating):
            m.weight = (mx.random.normal(m.weight.shape) * 0.1 + 1).astype(m.weight.dtype)
    flat = dict(tree_flatten(model.parameters()))
    rest = {}
    for k, v in flat.items():
        if EXPERTS not in k:
            mx.eval(v)
            rest[k] = _numpy(v)
    write_safetensors(folder / "model-00000.safetensors", rest)
    weight_map = {k: "model-00000.safetensors" for k in rest}
    rng = np.random.default_rng(0)
    for i in range(n_layers):
        prefix = f"language_model.model.layers.{i}{EXPERTS}"
        shapes = {k: (tuple(v.shape), "U32" if v.dtype == mx.uint32 else "BF16")
                  for k, v in flat.items() if k.startswith(prefix)}
        name = f"model-{i + 1:05d}.safetensors"
        write_experts(folder / name, shapes, rng)
        weight_map.update({k: name for k in shapes})
        print(f"  wrote {name} ({(folder / name).stat().st_size / 1e9:.2f} GB)", flush=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


# -- one run (its own process) ------------------------------------------------------------------------------
def drop_page_cache(files) -> None:
    """Evict the files' pages (dirty pages cannot be dropped: they are written out first)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_speeds(stored, probe: int, cached: bool, threads: int, piece: int, expert_reads: int = 32):
    """(sequential GB/s over `probe` bytes, GB/s of expert reads at random experts, GB/s of the
    same reads were each expert one contiguous range), uncached
    unless `cached` (then the page cache's speeds). The sequential read is one thread of
    16 MB reads; the expert reads run as the streamer runs them: `threads` threads, each
    expert's nine tensors in pieces of at most `piece` bytes. Buffers are reused: the probe
    adds nothing to the peak RSS the runs report."""
    drop = (lambda files: None) if cached else drop_page_cache
    t = max((t for k, t in stored.items() if EXPERTS in k), key=lambda t: t.nbytes)
    drop([t.file])
    fd = os.open(t.file, os.O_RDONLY)
    try:
        n, buf, done = min(probe, t.nbytes), bytearray(16 << 20), 0
        t0 = time.perf_counter()
        while done < n:
            done += os.preadv(fd, [buf], t.offset + done)
        seq = done / (time.perf_counter() - t0) / 1e9
    finally:
        os.close(fd)
    experts = [v for k, v in stored.items() if EXPERTS in k and ".layers.0." in k]
    drop({v.file for v in experts})
    reader = RangeReader()
    chosen = np.random.default_rng(1).choice(experts[0].shape[0], expert_reads, replace=False)
    pieces = [StoredTensor(v.name, v.file, "U8", (min(piece, v.row_nbytes - a),), v.offset + int(e) * v.row_nbytes + a,
                           min(piece, v.row_nbytes - a))
              for e in chosen for v in experts for a in range(0, v.row_nbytes, piece)]
    local, widest = threading.local(), max(v.row_nbytes for v in experts)

    def read(part):
        if not hasattr(local, "buf"):
            local.buf = np.empty(widest, np.uint8)
        reader.read_rows_into(part, (0, part.nbytes), local.buf[:part.nbytes])

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(read, pieces))
    rand = reader.bytes_read / (time.perf_counter() - t0) / 1e9

    # The same bytes as if `convert` wrote each expert as one contiguous range (expert-major):
    # expert-sized ranges at random places of the largest tensor, in pieces of PIECE bytes.
    per_expert = sum(v.row_nbytes for v in experts)
    big = max(experts, key=lambda v: v.nbytes)
    drop([big.file])
    starts = np.random.default_rng(2).choice(big.nbytes // per_expert, min(expert_reads, big.nbytes // per_expert),
                                             replace=False) * per_expert
    spans = [(int(o) + a, min(per_expert - a, piece)) for o in starts for a in range(0, per_expert, piece)]

    def read_span(span):
        if getattr(local, "buf", None) is None or local.buf.nbytes < piece:
            local.buf = np.empty(piece, np.uint8)
        part = StoredTensor(big.name, big.file, "U8", (span[1],), big.offset + span[0], span[1])
        reader.read_rows_into(part, (0, span[1]), local.buf[:span[1]])

    before, t0 = reader.bytes_read, time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(read_span, spans))
    major = (reader.bytes_read - before) / (time.perf_counter() - t0) / 1e9
    reader.close()
    return seq, rand, major


def random_routers(model, seed: int = 3) -> None:
    """Router weights of std 1/sqrt(hidden): scores of order one. (Larger ones saturate the
    sigmoid, every expert scores 1.0 and the top-k is the same few experts for every token.)"""
    mx.random.seed(seed)
    for layer in model.layers:
        gate = layer.mlp.gate
        gate.weight = mx.random.normal(gate.weight.shape) / gate.weight.shape[1] ** 0.5
    # Token embeddings well above the attention output: with random weights a decode step's
    # attention is close to the mean of the cached values, the same for every token, and
    # would otherwise make every token's routing the same.
    emb = model.language_model.model.embed_tokens
    emb.scales, emb.biases = emb.scales * 300000, emb.biases * 300000


def zipf_bias(model, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        gate = layer.mlp.gate
        E = gate.e_score_correction_bias.shape[0]
        bias = np.zeros(E, np.float32)
        bias[rng.permutation(E)] = 0.5 / np.arange(1, E + 1)
        gate.e_score_correction_bias = mx.array(bias)


def one_run(a) -> dict:
    folder = Path(a.folder)
    stored = locate(folder)
    bank = sum(t.nbytes for k, t in stored.items() if EXPERTS in k)
    piece = int(a.piece_mb * (1 << 20))
    seq, rand, major = disk_speeds(stored, a.disk_probe, a.page_cache, a.threads, piece)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # python, mlx, numpy: before any weight
    if not a.page_cache:
        drop_page_cache({t.file for t in stored.values()})
    if a.path != "auto":  # the direct path where the backend allows it, else copies; or as asked
        experts.writes_in_place = lambda: a.path == "direct"
    experts.READ_THREADS, experts.PIECE = a.threads, piece
    model, _ = load_model(folder, expert_memory=max(1, int(bank * a.fraction)))
    streamer = model.expert_streamer
    streamer.reader.drop_page_cache = not a.page_cache  # bench only: every miss comes from the disk
    random_routers(model)
    if a.routing == "zipf":
        zipf_bias(model)
    trace = None
    if a.trace:  # the routing, for scripts/expert_policies.py (the same for every budget)
        args = model.args
        trace = ExpertTrace(args.num_local_experts, args.num_experts_per_tok,
                            f"SYNTHETIC: bench_experts.py, a random model, {a.routing} routing, random tokens")
        model.record_experts(trace)
    rng = np.random.default_rng(2)
    path = "direct" if isinstance(streamer.layers[0], experts.DirectLayerExperts) else "copies"
    path += f" {a.threads}x{a.piece_mb:g}MB"
    out = dict(fraction=a.fraction, routing=a.routing, path=path, slots=streamer.n_slots, bank_gb=bank / 1e9,
               disk_seq_gbs=seq, disk_expert_gbs=rand, disk_expert_major_gbs=major)
    cache = model.make_cache()
    mx.eval(model(mx.array(rng.integers(0, VOCAB, (1, 16))), cache=cache))
    streamer.stats.reset()
    # Random tokens, not the argmax: a random model's greedy output repeats one token, whose
    # routing then repeats too; the bench wants routing as varied as its router makes it.
    toks = rng.integers(0, VOCAB, (a.decode, 1, 1))
    t0 = time.perf_counter()
    for tok in toks:
        mx.eval(model(mx.array(tok), cache=cache))
    dt = time.perf_counter() - t0
    s = streamer.stats
    per_tok = s.bytes_read / a.decode
    out.update(decode_tok_s=a.decode / dt, hits_per_tok=s.hits / a.decode, misses_per_tok=s.misses / a.decode,
               prefetched_per_tok=s.prefetched / a.decode, gb_per_tok=per_tok / 1e9,
               predicted_tok_s=(rand * 1e9 / per_tok) if per_tok else float("inf"))
    out["vs_predicted"] = out["decode_tok_s"] / out["predicted_tok_s"]
    if a.chunk:
        streamer.stats.reset()
        cache = model.make_cache()
        t0 = time.perf_counter()
        mx.eval(model(mx.array(rng.integers(0, VOCAB, (1, a.chunk))), cache=cache))
        dt = time.perf_counter() - t0
        out.update(prefill_tok_s=a.chunk / dt, prefill_gb=s.bytes_read / 1e9, prefill_read_gbs=s.bytes_read / dt / 1e9,
                   prefill_rounds=s.rounds, prefill_misses=s.misses)
    if trace is not None:
        trace.save(a.trace)
    nonexpert = sum(t.nbytes for k, t in stored.items() if EXPERTS not in k)
    kv = sum(cache_bytes(model.args, max(16 + a.decode, a.chunk)))
    pools = streamer.n_slots * len(streamer.layers) * streamer.layers[0].expert_nbytes
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out.update(peak_rss_gb=peak / 1e9, base_rss_gb=base_rss / 1e9, nonexpert_gb=nonexpert / 1e9,
               expert_memory_gb=pools / 1e9, kv_gb=kv / 1e9, peak_staged_gb=s.peak_staged_bytes / 1e9,
               # the bound, over what the process holds beyond the interpreter and libraries
               rss_vs_target=(peak - base_rss) / (1.1 * (nonexpert + pools + kv)))
    streamer.close()
    return out


# -- the table ---------------------------------------------------------------------------------------------
def table(rows) -> str:
    head = ("| routing | path | memory | slots | hits/tok | misses/tok | GB/tok | decode tok/s | disk-bound tok/s | "
            "ratio | prefill tok/s | prefill GB/s | disk seq / expert / expert-major GB/s | peak RSS GB (base + weights + experts + KV) | "
            "RSS / target |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['routing']} | {r['path']} | {r['fraction']:.0%} | {r['slots']} | {r['hits_per_tok']:.1f} | "
            f"{r['misses_per_tok']:.1f} | {r['gb_per_tok']:.3f} | {r['decode_tok_s']:.2f} | "
            f"{r['predicted_tok_s']:.2f} | {r['vs_predicted']:.0%} | {r.get('prefill_tok_s', 0):.1f} | "
            f"{r.get('prefill_read_gbs', 0):.2f} | {r['disk_seq_gbs']:.2f} / {r['disk_expert_gbs']:.2f} / "
            f"{r.get('disk_expert_major_gbs', 0):.2f} | "
            f"{r['peak_rss_gb']:.2f} ({r['base_rss_gb']:.2f} + {r['nonexpert_gb']:.2f} + {r['expert_memory_gb']:.2f} + "
            f"{r['kv_gb']:.2f}) | {r['rss_vs_target']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", required=True, help="where the model is written (reused if there)")
    p.add_argument("--layers", type=int, default=3, help="MoE layers (4.07 GB of experts each)")
    p.add_argument("--fractions", default="0.1,0.25,0.5,1.0", help="budgets, as fractions of the expert bank")
    p.add_argument("--routings", default="uniform,zipf")
    p.add_argument("--decode", type=int, default=16, help="decode tokens per run")
    p.add_argument("--chunk", type=int, default=2048, help="prefill chunk tokens (0: none)")
    p.add_argument("--disk-probe", type=int, default=1 << 30, help="bytes of the sequential disk read")
    p.add_argument("--page-cache", action="store_true",
                   help="read through the page cache (the bank read once first): the streaming's own cost, "
                        "without the disk")
    p.add_argument("--run-timeout", type=float, default=None, help="seconds a budget's run may take")
    p.add_argument("--json", default=None)
    p.add_argument("--trace", default=None, metavar="PREFIX",
                   help="save each routing's trace as PREFIX-ROUTING.npz (for scripts/expert_policies.py)")
    p.add_argument("--clean", action="store_true", help="delete the folder afterwards")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--path", choices=["auto", "direct", "copies"], default="auto",
                   help="how misses reach the pool: straight into it (where the backend allows), or copied")
    p.add_argument("--threads", type=int, default=READ_THREADS, help="expert-read threads")
    p.add_argument("--piece-mb", type=float, default=PIECE / (1 << 20), help="MB per read")
    p.add_argument("--fraction", type=float, help=argparse.SUPPRESS)
    p.add_argument("--routing", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        print("RESULT " + json.dumps(one_run(a)), flush=True)
        return 0
    folder = Path(a.folder)
    if not folder.exists():
        print(f"writing {a.layers} MoE layers to {folder}", flush=True)
        write_folder(folder, a.layers)
    if a.page_cache:
        for f in sorted(folder.glob("*.safetensors")):
            with open(f, "rb") as fh:
                while fh.read(1 << 26):
                    pass
    rows = []
    try:
        for routing in a.routings.split(","):
            for i, f in enumerate(a.fractions.split(",")):
                cmd = [sys.executable, __file__, "--one", "--folder", str(folder), "--fraction", f, "--routing",
                       routing, "--decode", str(a.decode), "--chunk", str(a.chunk), "--disk-probe", str(a.disk_probe),
                       "--path", a.path, "--threads", str(a.threads), "--piece-mb", str(a.piece_mb)]
                cmd += ["--page-cache"] if a.page_cache else []
                cmd += ["--trace", f"{a.trace}-{routing}.npz"] if a.trace and i == 0 else []
                try:
                    res = subprocess.run(cmd, capture_output=True, text=True, timeout=a.run_timeout)
                except subprocess.TimeoutExpired:
                    print(f"{routing} {f}: no result within {a.run_timeout} s", flush=True)
                    continue
                line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
                if res.returncode or not line:
                    print(res.stdout[-2000:], res.stderr[-3000:], file=sys.stderr)
                    return 1
                rows.append(json.loads(line[0][7:]))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        if a.clean:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
    print(table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
