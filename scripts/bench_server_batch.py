"""The server's aggregate throughput: N requests at once against the same N one after another.

A real server on 127.0.0.1 (a tiny random checkpoint, or --model FOLDER), requests through
the `openai` client. Both sides run in this process, interleaved round by round so that
load from other processes on the machine hits both alike; the best round of each counts.
This was an assertion in tests/test_batching.py (more than 1.3x on a 2-core CPU): timings
flake under load, so the suite keeps only what cannot (the replies equal, the batch wider
than one) and the ratio is measured here.

  python scripts/bench_server_batch.py                     # tiny model, 6 requests of 48 tokens
  python scripts/bench_server_batch.py --requests 8 --max-tokens 64 --rounds 3 --json out.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minimax_m3_mlx import synthetic  # noqa: E402
from minimax_m3_mlx.serving.server import Server, setup_arg_parser  # noqa: E402


def tiny_checkpoint(folder: Path) -> Path:
    config = synthetic.tiny_config()
    synthetic.write_checkpoint(folder, config, synthetic.random_weights(config, seed=11), "original")
    return folder


def measure(client, contents, max_tokens: int, rounds: int):
    def ask(content):
        r = client.chat.completions.create(model="default_model", max_tokens=max_tokens,
                                           messages=[{"role": "user", "content": content}])
        return r.usage.completion_tokens

    def wave(parallel: bool) -> float:
        t = time.perf_counter()
        if parallel:
            with concurrent.futures.ThreadPoolExecutor(len(contents)) as pool:
                tokens = sum(pool.map(ask, contents))
        else:
            tokens = sum(ask(c) for c in contents)
        return tokens / (time.perf_counter() - t)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # warm up the shapes
        list(pool.map(lambda c: client.chat.completions.create(
            model="default_model", max_tokens=4, messages=[{"role": "user", "content": c}]), contents[:2]))
    return [(wave(False), wave(True)) for _ in range(rounds)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a checkpoint folder (default: a tiny random one)")
    p.add_argument("--requests", type=int, default=6, help="requests per wave (default 6)")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens per reply (default 48)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of both waves, interleaved (default 2)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(tiny_checkpoint(Path(tmp) / "tiny"))
        srv = Server(setup_arg_parser().parse_args(
            ["--model", model, "--port", "0", "--decode-concurrency", str(args.requests),
             "--prompt-concurrency", "2", "--prompt-cache-size", "0"])).start()
        try:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.port}/v1", api_key="none", max_retries=0,
                                   timeout=600)
            contents = [f"Request number {i} about batching" for i in range(args.requests)]
            rounds = measure(client, contents, args.max_tokens, args.rounds)
        finally:
            srv.shutdown()
    alone, together = max(a for a, _ in rounds), max(t for _, t in rounds)
    result = {"machine": platform.platform(), "processor": platform.processor() or platform.machine(),
              "backend": "gpu" if mx.default_device() == mx.gpu else "cpu", "date": time.strftime("%Y-%m-%d"),
              "model": args.model or "synthetic.tiny_config", "requests": args.requests,
              "max_tokens": args.max_tokens, "rounds": [list(r) for r in rounds],
              "alone_tok_s": alone, "together_tok_s": together, "ratio": together / alone}
    print(f"aggregate tok/s: {alone:.1f} one at a time, {together:.1f} {args.requests} at once "
          f"({together / alone:.2f}x); rounds {[(round(a, 1), round(t, 1)) for a, t in rounds]}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
