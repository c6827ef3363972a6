"""Soak `minimax-m3 server`: N concurrent clients send mixed, partly hostile requests for a
bounded time to a real server process on 127.0.0.1, then the run is judged.

The requests (drawn at random, weighted): plain and streamed chats, streams the client
cancels midway, tool calls, prompts near and past the context, malformed JSON, oversized
bodies, wrong keys, foreign origins, unknown model names, remote and local image URLs.

It reports the requests sent, the answers by status (and by kind), p50/p99 latency, the
longest stall (the longest wait for a byte of an answer: for a stream, between two chunks),
and the server's resident memory over time. Targets (exit 1 if one is missed):

- every request gets an HTTP answer, except those the client cancels itself;
- each kind gets the status it should (no 5xx but the deliberate 503s);
- resident memory after warm-up grows by less than 10% over the run;
- the server answers correctly afterwards (a greedy reply equals the one before the run);
- Ctrl-C then ends it with exit 0 or 130, no traceback and no C++ abort.

  python scripts/soak_server.py --duration 1800 --clients 8 --json soak.json
  python scripts/soak_server.py --model ./MiniMax-M3-demo-4bit --duration 60

Without --model it writes a tiny random checkpoint (a 1024-token context) to a temporary folder.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEY = "soak-key"
HELLO = [{"role": "user", "content": "Hello there!"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
PIXEL_PNG = ("data:image/png;base64,iVBORw0KGgoAAAANSUHEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGA"
             "hKmMIQAAAABJRU5ErkJggg==")
# kind: (weight, statuses it may get; "cancelled": the client left on purpose)
KINDS = {
    "plain": (6, {200, 429, 503}), "stream": (5, {200, 429, 503}), "stream_cancel": (3, {"cancelled", 429, 503}),
    "tool": (3, {200, 429, 503}), "near_context": (2, {200, 429, 503}), "past_context": (2, {400}),
    "malformed_json": (2, {400}), "oversized": (1, {413}), "wrong_key": (2, {401}),
    "foreign_origin": (2, {403}), "unknown_model": (2, {404}), "remote_image": (1, {400}),
    "local_image": (1, {400}),
}
MAX_BODY = 1 << 20


def _tiny_checkpoint(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from minimax_m3_mlx import synthetic

    config = synthetic.tiny_config({"max_position_embeddings": 1024})
    synthetic.write_checkpoint(folder, config, synthetic.random_weights(config, seed=3), "original")
    return folder


def _rss_kb(pid: int) -> int:
    out = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return int(out) if out else 0


class Target:
    def __init__(self, port: int):
        self.port = port

    def send(self, body, stream=False, headers=None, cancel_after=None, path="/v1/chat/completions"):
        """(status or "cancelled", seconds, longest gap between bytes of the answer)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        hdrs = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}", **(headers or {})}
        start = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        try:
            conn.request("POST", path, body=data, headers=hdrs)
            resp = conn.getresponse()
            last = time.monotonic()
            gap = last - start
            if resp.status != 200 or not stream:
                resp.read()
                return resp.status, time.monotonic() - start, time.monotonic() - start
            lines = 0
            while True:
                line = resp.readline()
                now = time.monotonic()
                gap, last = max(gap, now - last), now
                if not line:
                    break
                lines += line.startswith(b"data: ")
                if cancel_after is not None and lines >= cancel_after:
                    return "cancelled", now - start, gap
            return resp.status, time.monotonic() - start, gap
        finally:
            conn.close()


class Soak:
    def __init__(self, target: Target, context: int, words_per_token: float, seed: int):
        self.t, self.context, self.wpt = target, context, words_per_token
        self.rng = random.Random(seed)
        self.records, self.lock = [], threading.Lock()

    def _words(self, tokens: int) -> str:
        return " ".join(["word"] * max(1, int(tokens * self.wpt)))

    def request(self, kind: str):
        chat = {"model": "default_model", "messages": HELLO, "max_tokens": 16}
        if kind == "plain":
            return self.t.send(chat)
        if kind in ("stream", "stream_cancel"):
            return self.t.send({**chat, "stream": True}, stream=True,
                               cancel_after=2 if kind == "stream_cancel" else None)
        if kind == "tool":
            return self.t.send({**chat, "tools": TOOLS,
                                "messages": [{"role": "user", "content": "Weather in Paris?"}]})
        if kind == "near_context":
            return self.t.send({"model": "default_model", "prompt": self._words(self.context - 40), "max_tokens": 64},
                               path="/v1/completions")
        if kind == "past_context":
            return self.t.send({"model": "default_model", "prompt": self._words(self.context + 64)},
                               path="/v1/completions")
        if kind == "malformed_json":
            return self.t.send(b'{"messages": [{"role": "user", "content": "hi"}')
        if kind == "oversized":
            return self.t.send(b'{"messages": "' + b"x" * (MAX_BODY + 10) + b'"}')
        if kind == "wrong_key":
            return self.t.send(chat, headers={"Authorization": "Bearer wrong"})
        if kind == "foreign_origin":
            return self.t.send(chat, headers={"Origin": "https://evil.example"})
        if kind == "unknown_model":
            return self.t.send({**chat, "model": self.rng.choice(["gpt-4o", "/etc", "../other-model"])})
        url = "http://169.254.169.254/latest/meta-data" if kind == "remote_image" else "/etc/passwd"
        return self.t.send({**chat, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what is it?"}]}]})

    def client(self, until: float):
        kinds, weights = list(KINDS), [w for w, _ in KINDS.values()]
        while time.monotonic() < until:
            with self.lock:
                kind = self.rng.choices(kinds, weights)[0]
            try:
                status, seconds, gap = self.request(kind)
            except Exception as e:  # no HTTP answer
                status, seconds, gap = f"no answer ({type(e).__name__})", 0.0, 0.0
            with self.lock:
                self.records.append({"kind": kind, "status": status, "seconds": seconds, "gap": gap,
                                     "at": time.monotonic()})


def _percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


def _greedy(target: Target) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", target.port, timeout=300)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(
        {"model": "default_model", "messages": HELLO, "max_tokens": 16, "temperature": 0}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    return body["choices"][0]["message"]["content"] if resp.status == 200 else f"HTTP {resp.status}: {body}"


def _calibrate(target: Target) -> float:
    """Words of the prompt per prompt token (the tokenizer's view of 'word word ...')."""
    conn = http.client.HTTPConnection("127.0.0.1", target.port, timeout=300)
    conn.request("POST", "/v1/completions", body=json.dumps({"prompt": " ".join(["word"] * 200), "max_tokens": 1}),
                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    usage = json.loads(conn.getresponse().read())["usage"]
    conn.close()
    return 200 / usage["prompt_tokens"]


def _start_server(model: Path, args, log) -> tuple:
    cmd = [sys.executable, "-m", "minimax_m3_mlx", "server", "--model", str(model), "--port", "0", "--api-key", KEY,
           "--max-body-bytes", str(MAX_BODY), "--decode-concurrency", str(args.decode_concurrency),
           "--max-queued-requests", str(args.max_queued), "--log-level", "WARNING", "--max-tokens", "64"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    line = proc.stdout.readline()  # "Serving MODEL at http://HOST:PORT/v1"
    if "Serving" not in line:
        proc.kill()
        raise RuntimeError(f"the server did not start: {line!r} (log: {log.name})")
    port = int(line.rsplit(":", 1)[1].split("/")[0])
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    return proc, Target(port)


def run(args) -> dict:
    tmp = tempfile.TemporaryDirectory(prefix="soak_")
    model = Path(args.model) if args.model else _tiny_checkpoint(Path(tmp.name) / "model")
    context = args.context or json.loads((model / "config.json").read_text()).get("text_config", {}).get(
        "max_position_embeddings", 1024)
    log = open(Path(tmp.name) / "server.log", "w+")
    proc, target = _start_server(model, args, log)
    soak = Soak(target, context, _calibrate(target), args.seed)
    before = _greedy(target)
    memory, start = [], time.monotonic()
    until = start + args.duration
    clients = [threading.Thread(target=soak.client, args=(until,), daemon=True) for _ in range(args.clients)]
    for c in clients:
        c.start()
    while any(c.is_alive() for c in clients):
        memory.append((round(time.monotonic() - start, 1), _rss_kb(proc.pid)))
        if args.progress:
            print(f"\r{memory[-1][0]:.0f}s: {len(soak.records)} requests, RSS {memory[-1][1] / 1024:.0f} MB",
                  end="", file=sys.stderr, flush=True)
        time.sleep(args.sample_seconds)
    after = _greedy(target)
    proc.send_signal(signal.SIGINT)
    try:
        exit_code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        exit_code = "hung"
    log.seek(0)
    log_text = log.read()
    return judge(soak.records, memory, args, before, after, exit_code, log_text)


def judge(records, memory, args, before, after, exit_code, log_text) -> dict:
    by_status = Counter(str(r["status"]) for r in records)
    by_kind = {k: dict(Counter(str(r["status"]) for r in records if r["kind"] == k)) for k in KINDS}
    unexpected = [r for r in records if r["status"] not in KINDS[r["kind"]][1]]
    answered = [r for r in records if isinstance(r["status"], int)]
    warm = [kb for t, kb in memory if t >= args.duration * args.warmup_fraction] or [kb for _, kb in memory]
    quarter = max(1, len(warm) // 4)
    base, end = statistics.median(warm[:quarter]), statistics.median(warm[-quarter:])
    growth = end / base - 1 if base else 0.0
    report = {
        "duration_s": args.duration, "clients": args.clients, "requests": len(records),
        "by_status": dict(by_status), "by_kind": by_kind,
        "latency_p50_s": round(_percentile([r["seconds"] for r in answered], 0.5), 3),
        "latency_p99_s": round(_percentile([r["seconds"] for r in answered], 0.99), 3),
        "longest_stall_s": round(max([r["gap"] for r in records] or [0.0]), 3),
        "rss_mb": " ".join(f"{t:.0f}s:{kb / 1024:.0f}" for t, kb in memory[:: max(1, len(memory) // 20)]),
        "rss_growth_after_warmup": round(growth, 4),
        "unexpected": [{k: r[k] for k in ("kind", "status")} for r in unexpected][:20],
        "same_reply_after": before == after, "exit_code": exit_code,
        "log_problems": [w for w in ("Traceback", "terminate called", "Aborted") if w in log_text],
    }
    report["targets_met"] = (not unexpected and growth < 0.10 and before == after and exit_code in (0, 130)
                             and not report["log_problems"])
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a converted folder (default: a tiny random checkpoint)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (default: 60)")
    p.add_argument("--clients", type=int, default=6, help="concurrent clients (default: 6)")
    p.add_argument("--decode-concurrency", type=int, default=4, help="the server's flag (default: 4)")
    p.add_argument("--max-queued", type=int, default=4, help="the server's --max-queued-requests (default: 4)")
    p.add_argument("--context", type=int, default=None, help="the model's context (default: its config's)")
    p.add_argument("--warmup-fraction", type=float, default=0.2, help="share of the run before memory is judged")
    p.add_argument("--sample-seconds", type=float, default=1.0, help="how often resident memory is read")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true", help="show requests and memory as the run goes")
    p.add_argument("--json", help="write the report here too")
    args = p.parse_args(argv)
    report = run(args)
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0 if report["targets_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
