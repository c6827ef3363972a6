"""`minimax-m3 server` (mlx-lm's server on our model) answered by the `openai` client.

The server runs on 127.0.0.1 (a free port) in this process, started and stopped by the
module fixture; one test starts the CLI in a subprocess. Replies are checked against
generation run directly on the same checkpoint. Where a test needs the model to write
reasoning or a tool call, a logits processor added to the server's own (for that request
only) forces the tokens; they then go through the server's sampler, detokenizer, text
state machine and tool parser like any generated tokens.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from signals import sigint_as_in_a_terminal

from minimax_m3_mlx import synthetic  # noqa: E402
from minimax_m3_mlx.chat_format.markers import NS_TOKEN, THINK_END, THINK_START, TOOL_CALL_END, TOOL_CALL_START  # noqa: E402

MAX_TOKENS = 12
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}]
HELLO = [{"role": "user", "content": "Hello!"}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_server")
    config = synthetic.tiny_config()
    synthetic.write_checkpoint(path, config, synthetic.random_weights(config, seed=5), "original")
    return path


@pytest.fixture(scope="module")
def direct(ckpt):
    """The same checkpoint loaded here, to compute what the server should answer."""
    from minimax_m3_mlx import load

    return load(str(ckpt))


@pytest.fixture(scope="module")
def server(ckpt):
    from minimax_m3_mlx.serving.server import Server, setup_arg_parser

    srv = Server(setup_arg_parser().parse_args(
        ["--model", str(ckpt), "--host", "127.0.0.1", "--port", "0", "--max-tokens", str(MAX_TOKENS)])).start()
    yield srv
    srv.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture
def force(monkeypatch):
    """force(text): the next request's reply is `text` (then end of turn)."""
    import mlx.core as mx
    import mlx_lm.server

    scripts = []
    original = mlx_lm.server._make_logits_processors

    def with_script(args):
        processors = original(args)
        if scripts:
            ids, state = scripts.pop(0), {"i": 0}

            def forced(tokens, logits):
                t = ids[min(state["i"], len(ids) - 1)]
                state["i"] += 1
                return mx.where(mx.arange(logits.shape[-1]) == t, logits, -mx.inf)

            processors.append(forced)
        return processors

    monkeypatch.setattr(mlx_lm.server, "_make_logits_processors", with_script)

    def queue(tokenizer, text):
        scripts.append(tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id])

    return queue


def expected(direct, messages, thinking, max_tokens=MAX_TOKENS, tools=None):
    from minimax_m3_mlx.serving.generate import chat_prompt, generate

    model, tok = direct
    prompt = chat_prompt(tok, messages, thinking=thinking, tools=tools)
    return prompt, generate(model, tok, prompt, max_tokens=max_tokens)


def test_plain_chat_and_prompt_cache(client, direct):
    prompt, gen = expected(direct, HELLO, "adaptive")  # the server's default mode
    assert gen.text and not gen.reasoning
    r = client.chat.completions.create(model="default_model", messages=HELLO)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == gen.text
    assert choice.finish_reason == "length" and choice.message.tool_calls is None
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == MAX_TOKENS
    # again: the same answer, the prompt now served from the server's KV cache
    again = client.chat.completions.create(model="default_model", messages=HELLO)
    assert again.choices[0].message.content == gen.text
    assert again.usage.prompt_tokens_details.cached_tokens > 0


def test_model_aliases(client, ckpt, direct):
    _, gen = expected(direct, HELLO, "adaptive")
    for name in (ckpt.name, str(ckpt)):
        r = client.chat.completions.create(model=name, messages=HELLO)
        assert r.choices[0].message.content == gen.text


def test_streamed_chat(client, direct):
    prompt, gen = expected(direct, HELLO, "adaptive")
    chunks = list(client.chat.completions.create(model="default_model", messages=HELLO, stream=True,
                                                 stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert sum(1 for d in deltas if d.content) > 1  # streamed, not one block
    assert "".join(d.content or "" for d in deltas) == gen.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.prompt_tokens == len(prompt) and chunks[-1].usage.completion_tokens == MAX_TOKENS


@pytest.mark.parametrize("mode, request_kwargs", [
    ("enabled", {"extra_body": {"chat_template_kwargs": {"thinking_mode": "enabled"}}}),
    ("enabled", {"reasoning_effort": "high"}),
    ("adaptive", {"extra_body": {"thinking": {"type": "adaptive"}}}),
    ("disabled", {"extra_body": {"chat_template_kwargs": {"enable_thinking": False}}}),
    ("disabled", {"extra_body": {"thinking": {"type": "disabled"}}}),
])
def test_thinking_mode_per_request(client, direct, mode, request_kwargs):
    prompt, gen = expected(direct, HELLO, mode, max_tokens=6)
    r = client.chat.completions.create(model="default_model", messages=HELLO, max_tokens=6, **request_kwargs)
    msg = r.choices[0].message
    assert r.usage.prompt_tokens == len(prompt)  # the prompt was rendered for this mode
    extra = msg.model_extra or {}
    if mode == "enabled":  # the prompt opened <mm:think>; the random model never closes it
        assert gen.reasoning and msg.content is None
        assert extra["reasoning_content"] == extra["reasoning"] == gen.reasoning
    else:
        assert msg.content == gen.text and "reasoning_content" not in extra


def test_reasoning_apart_from_answer_streamed(client, direct, force):
    _, tok = direct
    force(tok, THINK_START + "Let me think." + THINK_END + "The answer.")
    chunks = list(client.chat.completions.create(model="default_model", messages=HELLO, stream=True, max_tokens=200,
                                                 extra_body={"chat_template_kwargs": {"thinking_mode": "adaptive"}}))
    deltas = [c.choices[0].delta for c in chunks]
    reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    assert reasoning == "Let me think."
    assert "".join(d.content or "" for d in deltas) == "The answer."
    assert chunks[-1].choices[0].finish_reason == "stop"


def _call(city="Paris", days=3):
    return (TOOL_CALL_START + "\n" + NS_TOKEN + '<invoke name="get_weather">' + NS_TOKEN + f"<city>{city}" + NS_TOKEN
            + "</city>" + NS_TOKEN + f"<days>{days}" + NS_TOKEN + "</days>" + NS_TOKEN + "</invoke>\n" + TOOL_CALL_END)


def test_tool_call_returned_as_tool_calls(client, direct, force):
    _, tok = direct
    ask = [{"role": "user", "content": "Weather in Paris for 3 days?"}]
    force(tok, THINK_START + "Use the tool." + THINK_END + _call())
    r = client.chat.completions.create(model="default_model", messages=ask, tools=TOOLS, tool_choice="auto",
                                       max_tokens=200)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None and choice.message.model_extra["reasoning_content"] == "Use the tool."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}  # days typed by the schema

    # the conversation goes on with the call and its result sent back the OpenAI way
    history = ask + [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "sunny, 24C"}]
    force(tok, THINK_END + "Sunny, 24C.")
    r2 = client.chat.completions.create(model="default_model", messages=history, tools=TOOLS, max_tokens=200)
    assert r2.choices[0].message.content == "Sunny, 24C." and r2.choices[0].finish_reason == "stop"


def test_tool_call_streamed(client, direct, force):
    _, tok = direct
    force(tok, THINK_END + "Checking." + _call("Oslo", 2))
    chunks = list(client.chat.completions.create(
        model="default_model", messages=[{"role": "user", "content": "Oslo?"}], tools=TOOLS, stream=True,
        max_tokens=200))
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(d.content or "" for d in deltas) == "Checking."
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].id
    assert calls[0].function.name == "get_weather" and json.loads(calls[0].function.arguments) == {"city": "Oslo", "days": 2}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def _raw_post(port, path, body: bytes):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = resp.status, resp.read().decode()
    conn.close()
    return out


BAD_REQUESTS = [
    (dict(messages=[]), 400, "messages must be a non-empty list"),
    (dict(messages=[{"role": "wizard", "content": "hi"}]), 400, "role must be one of"),
    (dict(messages=[{"role": "user", "content": 5}]), 400, "content must be a string"),
    (dict(messages=HELLO, extra_body={"chat_template_kwargs": {"thinking_mode": "sometimes"}}), 400,
     "thinking_mode must be one of"),
    (dict(messages=HELLO, extra_body={"thinking": {"type": "disabled"}, "chat_template_kwargs": {"enable_thinking": True}}),
     400, "conflicting thinking modes"),
    (dict(messages=HELLO, extra_body={"reasoning_effort": "extreme"}), 400, "reasoning_effort must be one of"),
    (dict(messages=HELLO, tools=[{"type": "function"}]), 400, "tools[0]"),
    (dict(messages=[{"role": "tool", "content": "x"}]), 400, "chat template refused"),
    (dict(messages=HELLO, max_tokens=0), 400, "max_tokens must be at least 1"),
    (dict(messages=HELLO, temperature="hot"), 400, "temperature must be of type"),
    (dict(messages=HELLO, stop=[3]), 400, "stop must be"),
    (dict(messages=HELLO, model="/no/such/model"), 404, "is not served here"),
]


def test_malformed_requests_get_4xx_and_the_server_keeps_serving(client, server, direct):
    for kwargs, status, message in BAD_REQUESTS:
        kwargs = {"model": "default_model", **kwargs}
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(**kwargs)
        assert info.value.status_code == status, (kwargs, info.value.body)
        assert message in str(info.value.body), (kwargs, info.value.body)
    for path, body, status, message in [
        ("/v1/chat/completions", b"{not json", 400, "Invalid JSON"),
        ("/v1/chat/completions", b"[1, 2]", 400, "JSON dictionary"),
        ("/v1/chat/completions", b'{"model": "default_model"}', 400, "no messages"),
        ("/v1/completions", b'{"prompt": 7}', 400, "prompt must be a string"),
        ("/v1/nowhere", b"{}", 404, "Not Found"),
    ]:
        got_status, text = _raw_post(server.port, path, body)
        assert got_status == status and message in text, (path, got_status, text)
    _, gen = expected(direct, HELLO, "adaptive")
    r = client.chat.completions.create(model="default_model", messages=HELLO)
    assert r.choices[0].message.content == gen.text


def test_cli_server_subprocess(ckpt):
    """`python -m minimax_m3_mlx server` serves a chat and stops cleanly on Ctrl-C."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "minimax_m3_mlx", "server", "--model", str(ckpt), "--port", "0",
         "--thinking", "disabled", "--log-level", "WARNING"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, preexec_fn=sigint_as_in_a_terminal)
    try:
        deadline = time.time() + 60
        port = None
        while port is None and time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            m = re.search(r"at http://127\.0\.0\.1:(\d+)/v1", line)
            port = int(m.group(1)) if m else None
        assert port, "the server did not say where it listens"
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        r = c.chat.completions.create(model="default_model", messages=HELLO, max_tokens=4)
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4
        assert r.choices[0].message.content  # --thinking disabled: the reply is the answer
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=90)  # generous: CI's two cores may be busy
        assert rc == 0, proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_interrupted_load_leaves_no_thread(ckpt, monkeypatch):
    """Ctrl-C (or SIGTERM) while the model loads: Server() raises, and its generation thread
    ends too (left alone, it would load, then serve nobody and keep the process alive)."""
    import threading

    from minimax_m3_mlx.serving import server as srv

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(srv.MiniMaxResponseGenerator, "wait_loaded", interrupted)
    before = set(threading.enumerate())
    with pytest.raises(KeyboardInterrupt):
        srv.Server(srv.setup_arg_parser().parse_args(["--model", str(ckpt), "--port", "0"]))
    assert [t for t in threading.enumerate() if t not in before] == []


def test_stop_signals():
    """The listening rank (or the one process) takes SIGTERM and SIGHUP as Ctrl-C, unless
    they were ignored when it started; the ranks that follow ignore all three (shutdown.py)."""
    from minimax_m3_mlx.serving import shutdown

    class Group:
        def __init__(self, rank):
            self._rank = rank

        def rank(self):
            return self._rank

        def size(self):
            return 1

    saved = {sig: signal.getsignal(sig) for sig in shutdown.SIGNALS}
    try:
        for sig in shutdown.SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
        shutdown.install(Group(0))
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs here, in the main thread
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        shutdown.install(Group(1))
        assert all(signal.getsignal(sig) == signal.SIG_IGN for sig in shutdown.SIGNALS)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
