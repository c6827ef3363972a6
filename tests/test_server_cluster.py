"""`minimax-m3 server` under `mlx.launch --backend ring -n 2` on localhost, driven by the
`openai` client: only rank 0 listens, the other rank follows its requests, in both
`--parallel` modes; replies equal those of one process (an image chat too, where the vision
extra is installed), a request that fails on one rank fails for its client alone, and every
rank ends cleanly on Ctrl-C at the launcher's terminal and when the launcher alone is
stopped with SIGTERM."""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import openai
import pytest

from minimax_m3_mlx import synthetic

ROOT = Path(__file__).resolve().parents[1]
RANK = Path(__file__).parent / "dist_server.py"
sys.path.insert(0, str(Path(__file__).parent))
from dist_server import ENDED, FAIL_MARK  # noqa: E402
from ring import free_port_base, launch_args  # noqa: E402
from signals import sigint_as_in_a_terminal  # noqa: E402

MAX_TOKENS = 10
CHATS = [[{"role": "user", "content": "Hello there!"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours, please."}]]
PROMPT = "The capital of France is"


def _images_available() -> bool:
    """Whether the `vision` extra is installed (under CI it must be: see test_vision)."""
    from test_vision import _processors_or_skip

    try:
        _processors_or_skip()
    except pytest.skip.Exception:
        return False
    return True


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny checkpoint with a vision tower, and an image for it (None without the vision extra)."""
    from reference import build_reference

    path = tmp_path_factory.mktemp("cluster_server")
    config = synthetic.tiny_config()
    weights = synthetic.random_weights(config, seed=21)
    synthetic.write_checkpoint(path, config, {**weights, **build_reference(config, weights)[1]}, "original")
    if not _images_available():
        return path, None
    from PIL import Image

    image = path / "image.png"
    Image.fromarray(np.random.default_rng(4).integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(image)
    return path, image


def _image_chat(image):
    data = image.read_bytes() if isinstance(image, Path) else image
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "What is in this picture?"}]}]


def _ask(client, first_only=False, image=None):
    """The replies compared: chat (plain and streamed, and with an image where the vision
    extra is installed) and a text completion."""
    out = []
    for messages in CHATS[:1] if first_only else CHATS + ([_image_chat(image)] if image else []):
        r = client.chat.completions.create(model="default_model", messages=messages, max_tokens=MAX_TOKENS)
        out.append((r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens))
    if first_only:
        return out
    if image:  # an image that does not decode: a 400 for its client (on every rank alike), and on
        with pytest.raises(openai.BadRequestError, match="cannot identify image file"):
            client.chat.completions.create(model="default_model", messages=_image_chat(b"not a PNG"), max_tokens=2)
    chunks = client.chat.completions.create(model="default_model", messages=CHATS[0], max_tokens=MAX_TOKENS,
                                            stream=True)
    out.append("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
    r = client.completions.create(model="default_model", prompt=PROMPT, max_tokens=MAX_TOKENS)
    out.append((r.choices[0].text, r.usage.completion_tokens))
    return out


def _chat(client, messages, max_tokens):
    r = client.chat.completions.create(model="default_model", messages=messages, max_tokens=max_tokens)
    return r.choices[0].message.content, r.usage.completion_tokens


def _image_reply_in_process(path, image):
    """The greedy reply to _image_chat as `generate --image` computes it (multimodal.prepare)."""
    from minimax_m3_mlx.serving import generate, multimodal

    model, tokenizer = generate.load(str(path), thinking="disabled")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": multimodal.IMAGE_MARKER + "What is in this picture?"}],
        add_generation_prompt=True, tokenize=False, thinking_mode="disabled")
    p = multimodal.prepare(model, multimodal.load_processor(path, tokenizer), text, images=[image])
    gen = generate.generate(model, tokenizer, p.input_ids.tolist(), max_tokens=MAX_TOKENS, input_embeddings=p.embeddings)
    return gen.text, gen.generation_tokens


def _client(port):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def alone(ckpt):
    from minimax_m3_mlx.serving.server import Server, setup_arg_parser

    path, image = ckpt
    srv = Server(setup_arg_parser().parse_args(["--model", str(path), "--port", "0", "--thinking", "disabled"]))
    srv.start()
    try:
        replies = _ask(_client(srv.port), image=image)
    finally:
        srv.shutdown()
    if image is not None:  # the server's image reply is generate --image's
        content, _, n = replies[2]
        assert (content, n) == _image_reply_in_process(path, image)
    return replies


def _logs(folder) -> str:
    """The launcher's output and each rank's own (dist_server.py's RANK_LOGS)."""
    return "\n".join(f"--- {f.name}:\n{f.read_text()[-3000:]}" for f in sorted(folder.glob("*.log")))


def _wait_ready(port, proc, folder, deadline=120):
    end = time.time() + deadline
    while time.time() < end:
        if proc.poll() is not None:
            pytest.fail(f"mlx.launch ended (code {proc.returncode}) before serving:\n{_logs(folder)}")
        try:
            # a client that gives up early would leave a BrokenPipe traceback in rank 0's log
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"no server on port {port} after {deadline} s:\n{_logs(folder)}")


def _ranks(launcher_pid):
    """The launcher's children: the ranks (mlx.launch's shell execs each). From pid and
    parent pid alone: `ps` may cut a long command line to the terminal's width."""
    ps = subprocess.run(["ps", "-A", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    return [int(pid) for pid, ppid in (line.split() for line in ps.splitlines()) if int(ppid) == launcher_pid]


def _running(pid) -> bool:
    """Alive and not a zombie (a rank whose launcher died is reaped by whoever adopts it)."""
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return bool(state) and not state.startswith("Z")


def _stop(proc, mode, folder, deadline=60):
    """Stop the cluster as its user would, and wait for every rank to end.

    tensor: Ctrl-C at the launcher's terminal, which sends SIGINT to its whole process
    group (the launcher prints its own KeyboardInterrupt traceback). pipeline: SIGTERM to
    the launcher alone (`kill PID`, a service manager), which ends it at once: its ranks
    must notice and end by themselves."""
    ranks = _ranks(proc.pid)
    assert len(ranks) == 2, ranks
    if mode == "tensor":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.terminate()
    end = time.time() + deadline
    while time.time() < end and any(_running(pid) for pid in ranks):
        time.sleep(0.5)
    if any(_running(pid) for pid in ranks):
        ps = subprocess.run(["ps", "-o", "pid,ppid,stat,wchan:20,args", "-g", str(proc.pid)], capture_output=True,
                            text=True).stdout
        for pid in ranks:
            os.kill(pid, signal.SIGUSR1)  # their stacks, into their logs
        time.sleep(2)
        pytest.fail(f"ranks still running {deadline} s after the stop:\n{ps}\n{_logs(folder)}")
    proc.wait(timeout=30)


@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
def test_server_under_mlx_launch(ckpt, alone, mode, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               RANK_LOGS=str(tmp_path))
    port = free_port_base(1)
    path, image = ckpt
    cmd = [*launch_args(2), str(RANK), "--model", str(path),
           "--port", str(port), "--parallel", mode, "--thinking", "disabled"]
    with open(tmp_path / "launch.log", "wb") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=sigint_as_in_a_terminal)
    try:
        _wait_ready(port, proc, tmp_path)
        client = _client(port)
        assert _ask(client, image=image) == alone  # with the image: the tower on the ranks that embed
        # concurrent requests (long enough to overlap), batched on every rank (each prints its
        # widest batch): the same replies as one at a time
        asks = [(CHATS[i % 2], 24 + 4 * i) for i in range(4)]
        one_by_one = [_chat(client, *a) for a in asks]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            assert list(pool.map(lambda a: _chat(client, *a), asks)) == one_by_one

        # fails on rank 1 alone: an OpenAI-shaped 500 for this client, and the ranks go on
        with pytest.raises(openai.InternalServerError) as failed:
            client.chat.completions.create(model="default_model", max_tokens=MAX_TOKENS,
                                           messages=[{"role": "user", "content": FAIL_MARK}])
        error = failed.value.body
        assert error["type"] == "server_error" and "rank 1" in error["message"], error
        assert "injected failure" in error["message"]
        # a client that leaves mid-reply: the ranks finish it together and stay in step
        chunks = client.chat.completions.create(model="default_model", messages=CHATS[1], max_tokens=40, stream=True)
        next(iter(chunks))
        chunks.close()
        assert _ask(client, first_only=True) == alone[:1]

        _stop(proc, mode, tmp_path)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left, the launcher gone or not
        proc.wait()
    logs = {r: (tmp_path / f"rank{r}.log").read_text() for r in range(2)}
    assert logs[0].count("Serving ") == 1 and "Serving " not in logs[1], _logs(tmp_path)  # rank 0 alone listens
    for rank, text in logs.items():  # every rank batched, and ended its own way, cleanly, after the last collective
        assert re.search(rf"rank {rank}: batch width [2-4]", text), [line for line in text.splitlines() if "width" in line]
        assert text.rstrip().endswith(f"{ENDED} 0"), _logs(tmp_path)
        for bad in ("Address already in use", "Traceback", "[ring]", "terminate called"):
            assert bad not in text, _logs(tmp_path)
    launcher = (tmp_path / "launch.log").read_text()
    assert "exited with code" not in launcher and "was killed" not in launcher, _logs(tmp_path)



def test_a_killed_rank_ends_rank_0_with_one_line(ckpt, tmp_path):
    """A follower killed with SIGKILL mid-reply: rank 0 (whose collectives would wait for it
    for ever) ends within 60 s, with one line naming the lost rank and no traceback."""
    from minimax_m3_mlx import load

    path, _ = ckpt
    no_eos = {str(t): -100.0 for t in load(str(path))[1].eos_token_ids}  # a reply that runs until the kill
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               RANK_LOGS=str(tmp_path))
    port = free_port_base(1)
    cmd = [*launch_args(2), str(RANK), "--model", str(path), "--port", str(port), "--thinking", "disabled"]
    with open(tmp_path / "launch.log", "wb") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=sigint_as_in_a_terminal)
    stream = None
    try:
        _wait_ready(port, proc, tmp_path)
        stream = _client(port).chat.completions.create(model="default_model", messages=CHATS[0], max_tokens=3000,
                                                       stream=True, extra_body={"logit_bias": no_eos})
        next(iter(stream))
        pids = {r: int(re.search(rf"rank {r} pid (\d+)", (tmp_path / f"rank{r}.log").read_text()).group(1))
                for r in range(2)}
        os.kill(pids[1], signal.SIGKILL)
        end = time.time() + 60
        while time.time() < end and _running(pids[0]):
            time.sleep(0.5)
        assert not _running(pids[0]), f"rank 0 still running 60 s after rank 1 was killed:\n{_logs(tmp_path)}"
    finally:
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log = "\n".join(line for line in (tmp_path / "rank0.log").read_text().splitlines()
                    if not line.startswith("[ring]"))  # the ring backend's own complaints about the lost peer
    assert [line for line in log.splitlines() if "lost rank" in line] == [
        "minimax-m3 server: error: lost rank 1 (its process ended); the cluster cannot go on without it"], log
    assert "Traceback" not in log and "terminate called" not in log, log
