"""Replay a coding agent's session against the server: what each turn costs.

An agent re-sends its whole conversation every turn: a long system prompt (instructions,
repository context), then a growing list of its replies and tool results. This script
plays such a session through the `openai` client (greedy, short replies): `--turns`
turns, each adding a tool result of `--min-result`..`--max-result` tokens, with a server
restart before turn `--restart-at` (the first turn whose prompt passes `--restart-tokens`
if that comes first). It runs the session against:

- ours: `minimax-m3 server --prompt-cache-dir DIR` (the restart keeps DIR; the page cache of
  its files is dropped first on Linux, so the restore really reads the disk);
- mlx-lm's own server and port (`mlx_lm.server`) on the same folder, in the same run,
  unless `--skip-mlx-lm` (its prompt cache lives in memory only: the restart loses it).

Per turn it prints the prompt tokens, the tokens served from cache, the time to first token,
and the bytes the server process wrote and read (Linux /proc; "-" elsewhere). After the
session it measures, in the same run: a full prefill of the last prompt (a server with no
cache), and the disk's sequential read speed (a file of the cache's size, page cache
dropped). It checks the targets:

- from the second turn on, the tokens computed per turn are at most the new tokens plus one
  cache block;
- after the restart at least 95% of the prompt comes from disk;
- the restore reads at least 50% of the disk's sequential speed;
- at 32K tokens and more, the time to first token after the restart is at most 10% of a
  full prefill.

With no `--model`, it writes a tiny random bf16 model whose context is long enough (the
real model's KV and index heads per layer on the test model's other widths, sparse blocks
of 64 x top-16 as the real model's 128 x 16, 64K positions). `--model FOLDER` runs any folder (a real-width one on a GPU or a Mac).

    python scripts/bench_session.py --json benchmarks/session_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minimax_m3_mlx import synthetic  # noqa: E402

BLOCK = 256


def long_context_model(folder: Path, positions: int, dtype: str = "bfloat16") -> Path:
    # The real model's KV shape per layer (4 KV heads of 128, one index key of 128) on the
    # test model's other widths: blocks of a realistic size per layer on disk.
    config = synthetic.tiny_config({"max_position_embeddings": positions, "num_key_value_heads": 4, "head_dim": 128,
                                    "rotary_dim": 64,
                                    "sparse_attention_config": {"sparse_block_size": 64, "sparse_topk_blocks": 16,
                                                                "sparse_num_index_heads": 4, "sparse_index_dim": 128}})
    weights = synthetic.random_weights(config, seed=3)
    if dtype != "float32":
        weights = {k: synthetic.round_to_dtype(v, dtype) for k, v in weights.items()}
    synthetic.write_checkpoint(folder, config, weights, "original", dtype=dtype)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, cmd, log: Path):
        self.port = free_port()
        self.log_path = log
        self.log = open(log, "a")
        self.proc = subprocess.Popen([*cmd, "--port", str(self.port)], stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=ROOT)
        self._wait()

    def _wait(self, timeout=600):
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: see {self.log_path}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("server did not start")

    def io(self):
        try:
            text = Path(f"/proc/{self.proc.pid}/io").read_text()
        except OSError:
            return None
        d = dict(line.split(": ") for line in text.strip().splitlines())
        return int(d["read_bytes"]), int(d["write_bytes"])

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def tool_result(rng, n: int) -> str:
    words = ["def", "return", "self", "import", "class", "for", "in", "if", "else", "x", "y", "path", "data"]
    out = []
    while sum(map(len, out)) < n:
        out.append(" ".join(rng.choice(words, 8)) + "\n")
    return "".join(out)[:n]


def ask(client, messages, max_tokens):
    t0 = time.perf_counter()
    ttft, text, usage = None, [], None
    for chunk in client.chat.completions.create(model="default_model", messages=messages, max_tokens=max_tokens,
                                                stream=True, stream_options={"include_usage": True}, temperature=0):
        if chunk.choices and ttft is None:
            ttft = time.perf_counter() - t0
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    cached = getattr(getattr(usage, "prompt_tokens_details", None), "cached_tokens", None) or 0
    return "".join(text), usage.prompt_tokens, cached, ttft, usage.completion_tokens


def drop_page_cache(folder: Path) -> None:
    """Evict the folder's files from the page cache (Linux), so the next read is the disk's."""
    if not hasattr(os, "posix_fadvise"):
        return
    for f in folder.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def disk_read_speed(folder: Path, nbytes: int) -> float:
    """Sequential read speed of the disk under `folder` (bytes/s), page cache dropped."""
    f = folder / "read-speed.bin"
    chunk = np.random.default_rng(0).integers(0, 255, 1 << 24, dtype=np.uint8).tobytes()
    with open(f, "wb") as out:
        for _ in range(max(1, nbytes // len(chunk))):
            out.write(chunk)
    drop_page_cache(folder)
    t0, n = time.perf_counter(), 0
    with open(f, "rb", buffering=0) as fh:
        while block := fh.read(1 << 24):
            n += len(block)
    dt = time.perf_counter() - t0
    f.unlink()
    return n / dt


def session(name, start, a, rng_seed, cache_dir=None):
    """Play the session; returns the per-turn rows."""
    import openai

    rng = np.random.default_rng(rng_seed)
    messages = [{"role": "system", "content": "You are a coding agent.\n" + tool_result(rng, a.system_tokens)}]
    server, rows = start(), []
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="none", timeout=3600, max_retries=0)
    restarted = False
    try:
        for turn in range(a.turns):
            messages.append({"role": "user", "content": "Tool result:\n" + tool_result(
                rng, int(rng.integers(a.min_result, a.max_result)))})
            size = sum(len(m["content"]) for m in messages)
            restart = not restarted and (turn == a.restart_at or size >= a.restart_tokens)
            if restart:
                server.stop()
                if cache_dir is not None:
                    drop_page_cache(cache_dir)
                server = start()
                client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="none", timeout=3600,
                                       max_retries=0)
                restarted = True
            io0 = server.io()
            text, prompt, cached, ttft, completion = ask(client, messages, a.max_tokens)
            io1 = server.io()
            rows.append({"impl": name, "turn": turn + 1, "restart": restart, "prompt": prompt, "cached": cached,
                         "completion": completion, "ttft_s": ttft,
                         "new": prompt - (rows[-1]["prompt"] + rows[-1]["completion"] if rows else 0),
                         "read_mb": (io1[0] - io0[0]) / 1e6 if io0 and io1 else None,
                         "written_mb": (io1[1] - io0[1]) / 1e6 if io0 and io1 else None})
            print(row_line(rows[-1]), flush=True)
            messages.append({"role": "assistant", "content": text})
    finally:
        server.stop()
    return rows, messages[:-1]


def row_line(r) -> str:
    mb = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    return (f"{r['impl']:7s} {r['turn']:3d}{'*' if r['restart'] else ' '} {r['prompt']:7d} {r['cached']:7d} "
            f"{r['prompt'] - r['cached']:7d} {r['ttft_s']:8.2f} {mb(r['read_mb']):>8s} {mb(r['written_mb']):>8s}")


def restore_speed(log: Path):
    """(MB, s) of the last restore our server logged."""
    found = re.findall(r"from disk \(([\d.]+) MB read in ([\d.]+) s\)", log.read_text())
    return tuple(map(float, found[-1])) if found else None


def run(a):
    work = Path(a.work or tempfile.mkdtemp(prefix="bench-session-"))
    work.mkdir(parents=True, exist_ok=True)
    model = Path(a.model) if a.model else long_context_model(work / "model", a.positions, a.dtype)
    cache_dir = work / "prompt-cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    py = sys.executable
    ours_log = work / "ours.log"
    common = ["--model", str(model), "--max-tokens", str(a.max_tokens)]
    ours = lambda: ServerProcess([py, "-m", "minimax_m3_mlx", "server", *common, "--thinking", "disabled",  # noqa: E731
                                  "--prompt-cache-dir", str(cache_dir)], ours_log)
    print(f"{'impl':7s} {'turn':>4s} {'prompt':>7s} {'cached':>7s} {'computed':>7s} {'ttft s':>8s} "
          f"{'read MB':>8s} {'wrote MB':>8s}   (* = after the restart)")
    rows, last = session("ours", ours, a, 0, cache_dir)
    restore = restore_speed(ours_log)
    # A full prefill of the last prompt, same server, no cache at all.
    full = ServerProcess([py, "-m", "minimax_m3_mlx", "server", *common, "--thinking", "disabled",
                          "--prompt-cache-size", "0"], work / "full.log")
    import openai
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{full.port}/v1", api_key="none", timeout=3600, max_retries=0)
        full_ttft = ask(client, last, a.max_tokens)[3]
    finally:
        full.stop()
    cache_bytes = sum(f.stat().st_size for f in cache_dir.rglob("*") if f.is_file())
    disk = disk_read_speed(work, max(cache_bytes, 1 << 28))
    if not a.skip_mlx_lm:
        lm = lambda: ServerProcess([py, "-m", "mlx_lm", "server", *common], work / "mlx_lm.log")  # noqa: E731
        rows += session("mlx-lm", lm, a, 0)[0]
    return summarize(rows, restore, full_ttft, disk, a)


def summarize(rows, restore, full_ttft, disk, a) -> dict:
    ours = [r for r in rows if r["impl"] == "ours"]
    after = next(r for r in ours if r["restart"])
    worst = max((r["prompt"] - r["cached"]) - (r["new"] + BLOCK) for r in ours[1:] if not r["restart"])
    restore_gbs = restore[0] / 1e3 / restore[1] if restore and restore[1] > 0 else None
    out = {
        "rows": rows, "full_prefill_ttft_s": full_ttft, "disk_read_gbs": disk / 1e9, "restore": restore,
        "targets": {
            "computed <= new + one block (turns 2+)": worst <= 0,
            "after restart >= 95% from disk": after["cached"] >= 0.95 * after["prompt"],
            "restore >= 50% of disk speed": restore_gbs is not None and restore_gbs >= 0.5 * disk / 1e9,
            "ttft after restart <= 10% of full prefill (>= 32K)":
                after["prompt"] < 32768 or after["ttft_s"] <= 0.1 * full_ttft,
        },
    }
    print(f"\nafter the restart (turn {after['turn']}, {after['prompt']} tokens): {after['cached']} from disk "
          f"({after['cached'] / after['prompt']:.1%}), first token in {after['ttft_s']:.2f} s; "
          f"a full prefill of the last prompt: {full_ttft:.2f} s")
    if restore:
        print(f"restore: {restore[0]:.1f} MB in {restore[1]:.2f} s = {restore_gbs:.2f} GB/s; "
              f"disk sequential read: {disk / 1e9:.2f} GB/s")
    for k, v in out["targets"].items():
        print(f"  {'met ' if v else 'MISSED'} {k}")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a model folder (default: a tiny long-context bf16 model written here)")
    p.add_argument("--turns", type=int, default=22)
    p.add_argument("--system-tokens", type=int, default=2000)
    p.add_argument("--min-result", type=int, default=300)
    p.add_argument("--max-result", type=int, default=3000)
    p.add_argument("--max-tokens", type=int, default=8, help="reply tokens per turn")
    p.add_argument("--restart-at", type=int, default=18, help="restart the server before this turn (0-based)")
    p.add_argument("--restart-tokens", type=int, default=34000, help="or before the first prompt this long")
    p.add_argument("--positions", type=int, default=65536, help="context of the default model")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="the default model's dtype (mlx-lm's port runs bf16 MoE layers on the GPU and Metal only: "
                        "MLX's CPU gather_mm takes float32)")
    p.add_argument("--skip-mlx-lm", action="store_true")
    p.add_argument("--work", help="folder for the model, caches and logs (default: a temporary one)")
    p.add_argument("--json", help="write the rows and figures here")
    a = p.parse_args(argv)
    out = run(a)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
