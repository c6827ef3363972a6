"""`minimax-m3 server` ends cleanly as a person ends it: Ctrl-C typed into its terminal (a
pty here, so the terminal's line discipline sends SIGINT to the server's process group),
after real requests through the `openai` client, on a 4-bit converted model; several times,
at several points (idle, mid-stream, mid-prefill, under a batch), and by SIGTERM and SIGHUP.

Each run must end with exit 0 or 130 and print no traceback and no C++ abort ("terminate
called without an active exception", which MLX's CPU streams made on an ended thread gave).
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import signal
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import openai
import pytest
from signals import sigint_as_in_a_terminal

from minimax_m3_mlx import synthetic

ROOT = Path(__file__).resolve().parents[1]
HELLO = [{"role": "user", "content": "Hello there!"}]
BAD = ("Traceback", "terminate called", "Aborted", "Fatal Python error")


@pytest.fixture(scope="module")
def model4(tmp_path_factory):
    """A tiny checkpoint converted with -q --q-bits 4, as a user converts the demo model."""
    src, dst = tmp_path_factory.mktemp("shutdown_src"), tmp_path_factory.mktemp("shutdown_q4") / "q4"
    config = synthetic.tiny_config()
    synthetic.write_checkpoint(src, config, synthetic.random_weights(config, seed=8), "original")
    from minimax_m3_mlx.convert.cli import main as convert

    convert(["--hf-path", str(src), "--mlx-path", str(dst), "-q", "--q-bits", "4", "--no-progress"])
    return dst


class Terminal:
    """The server's command run in a pty of its own session, as a shell in a terminal runs it."""

    def __init__(self, model: Path):
        master, slave = pty.openpty()

        def controlling_tty():  # after setsid (start_new_session): the pty becomes this session's terminal
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
            sigint_as_in_a_terminal()  # a shell gives its job the default signals, whatever ran the tests

        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "minimax_m3_mlx", "server", "--model", str(model), "--port", "0",
             "--decode-concurrency", "4", "--log-level", "WARNING"],
            stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True, preexec_fn=controlling_tty)
        os.close(slave)
        self.master, self.output = master, bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = self._wait_port()

    def _read(self):
        while True:
            try:
                data = os.read(self.master, 4096)
            except OSError:
                return
            if not data:
                return
            self.output += data

    def _wait_port(self, seconds=120) -> int:
        deadline = time.time() + seconds
        while time.time() < deadline and self.proc.poll() is None:
            m = re.search(rb"at http://127\.0\.0\.1:(\d+)/v1", bytes(self.output))
            if m:
                return int(m.group(1))
            time.sleep(0.1)
        raise AssertionError(f"the server did not start: {bytes(self.output).decode(errors='replace')}")

    def ctrl_c(self):
        os.write(self.master, b"\x03")

    def wait(self, seconds=180) -> int:
        try:
            return self.proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:  # say what the server printed, not only that it hung
            raise AssertionError(f"the server did not end within {seconds} s:\n{self.text()}") from None
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._reader.join(timeout=5)
            os.close(self.master)

    def text(self) -> str:
        return bytes(self.output).decode(errors="replace")


def _client(port):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)


def _real_requests(client):
    """A plain, a streamed and four concurrent requests, as the report that found the abort made."""
    assert client.chat.completions.create(model="default_model", messages=HELLO, max_tokens=8).choices
    assert list(client.chat.completions.create(model="default_model", messages=HELLO, max_tokens=8, stream=True))
    threads = [threading.Thread(target=client.chat.completions.create,
                                kwargs=dict(model="default_model", messages=HELLO, max_tokens=8)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _in_flight(client, n, stream, prompt_words=1):
    """Start n long requests in the background; returns after the first answer bytes (streams) or at once."""
    started = threading.Event()
    messages = [{"role": "user", "content": " ".join(["hello"] * prompt_words)}]

    def one():
        try:
            r = client.chat.completions.create(model="default_model", messages=messages, max_tokens=2000, stream=stream)
            for _ in (r if stream else []):
                started.set()
        except openai.APIError:  # the server went away mid-reply: expected here
            pass

    for _ in range(n):
        threading.Thread(target=one, daemon=True).start()
    started.wait(60) if stream else time.sleep(0.3)


# (what is going on when the signal comes, how it is sent)
# Without the streams freed, about one run in three aborted: five runs miss it once in ~8 suites.
POINTS = [("idle", "ctrl-c"), ("idle-again", "ctrl-c"), ("mid-stream", "ctrl-c"), ("under-a-batch", "SIGTERM"),
          ("mid-prefill", "SIGHUP")]


@pytest.mark.parametrize("point, how", POINTS, ids=[f"{p}-{h}" for p, h in POINTS])
def test_server_ends_cleanly(model4, point, how):
    term = Terminal(model4)
    client = _client(term.port)
    _real_requests(client)
    if point == "mid-stream":
        _in_flight(client, 1, stream=True)
    elif point == "under-a-batch":
        _in_flight(client, 4, stream=True)
    elif point == "mid-prefill":
        _in_flight(client, 1, stream=False, prompt_words=3000)
    if how == "ctrl-c":
        term.ctrl_c()
    else:
        term.proc.send_signal(getattr(signal, how))
    rc = term.wait()
    out = term.text()
    assert rc in (0, 130), out
    assert not [b for b in BAD if b in out], out
