"""The server's refusals: each one's HTTP status and OpenAI-shaped body, the context limit
(a 400 for a prompt that fills it; finish_reason "length" and [DONE] for a reply that
reaches it), and /v1/models on a machine without a Hugging Face cache.

The model is the tiny checkpoint with a 400-token context; its chat template alone takes
311 tokens of a short conversation.
"""

from __future__ import annotations

import http.client
import json

import openai
import pytest

from minimax_m3_mlx import synthetic

CONTEXT = 400
HELLO = [{"role": "user", "content": "Hello!"}]
LONG = [{"role": "user", "content": " ".join(["word"] * 120)}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("server_errors")
    config = synthetic.tiny_config({"max_position_embeddings": CONTEXT})
    synthetic.write_checkpoint(path, config, synthetic.random_weights(config, seed=5), "original")
    return path


@pytest.fixture(scope="module")
def server(ckpt):
    from minimax_m3_mlx.serving.server import Server, setup_arg_parser

    srv = Server(setup_arg_parser().parse_args(
        ["--model", str(ckpt), "--port", "0", "--max-tokens", "8", "--thinking", "disabled"])).start()
    yield srv
    srv.shutdown()


@pytest.fixture(scope="module")
def no_eos(ckpt):
    """logit_bias that keeps the model from ending its reply (so that it runs into the limit)."""
    from minimax_m3_mlx import load

    tok = load(str(ckpt))[1]
    return {str(t): -100.0 for t in tok.eos_token_ids}


def request(port, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    if data is None and method == "POST":
        conn.putrequest(method, path)
        for k, v in hdrs.items():
            conn.putheader(k, v)
        conn.endheaders()
    else:
        conn.request(method, path, body=data, headers=hdrs)
    resp = conn.getresponse()
    out = resp.status, resp.read().decode()
    conn.close()
    return out


CHAT = "/v1/chat/completions"
# (id, path, body, status, message part, param, code)
REFUSALS = [
    ("context-chat", CHAT, {"messages": LONG}, 400, "the model's context holds 400", "messages",
     "context_length_exceeded"),
    ("context-completion", "/v1/completions", {"prompt": " ".join(["word"] * 450)}, 400,
     "the model's context holds 400", "prompt", "context_length_exceeded"),
    ("messages-empty", CHAT, {"messages": []}, 400, "messages must be a non-empty list", "messages", None),
    ("messages-missing", CHAT, {"model": "default_model"}, 400, "no messages", None, None),
    ("role", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "must be one of", "messages[0].role",
     None),
    ("content-type", CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "must be a string",
     "messages[0].content", None),
    ("image-part", CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
     400, "only text parts", None, None),
    ("max-tokens-zero", CHAT, {"messages": HELLO, "max_tokens": 0}, 400, "max_tokens must be at least 1",
     "max_tokens", None),
    ("max-tokens-type", CHAT, {"messages": HELLO, "max_tokens": "many"}, 400, "max_tokens must be of type",
     "max_tokens", None),
    ("temperature", CHAT, {"messages": HELLO, "temperature": -1}, 400, "temperature must be at least 0",
     "temperature", None),
    ("top-p", CHAT, {"messages": HELLO, "top_p": 5}, 400, "top_p must be at most 1", "top_p", None),
    ("top-k", CHAT, {"messages": HELLO, "top_k": -3}, 400, "top_k must be at least 0", "top_k", None),
    ("min-p", CHAT, {"messages": HELLO, "min_p": 2}, 400, "min_p must be at most 1", "min_p", None),
    ("seed", CHAT, {"messages": HELLO, "seed": "x"}, 400, "seed must be of type", "seed", None),
    ("stream", CHAT, {"messages": HELLO, "stream": "yes"}, 400, "stream must be of type", "stream", None),
    ("logprobs", CHAT, {"messages": HELLO, "logprobs": "yes"}, 400, "logprobs must be of type", "logprobs", None),
    ("top-logprobs", CHAT, {"messages": HELLO, "top_logprobs": 50}, 400, "top_logprobs must be at most",
     "top_logprobs", None),
    ("logit-bias", CHAT, {"messages": HELLO, "logit_bias": {"a": 1}}, 400, "logit_bias must be", "logit_bias",
     None),
    ("stop", CHAT, {"messages": HELLO, "stop": [3]}, 400, "stop must be", "stop", None),
    ("tools", CHAT, {"messages": HELLO, "tools": {"name": "f"}}, 400, "tools must be a list", "tools", None),
    ("tool-entry", CHAT, {"messages": HELLO, "tools": [{"type": "function"}]}, 400, "tools[0]", "tools[0]", None),
    ("thinking-mode", CHAT, {"messages": HELLO, "chat_template_kwargs": {"thinking_mode": "sometimes"}}, 400,
     "thinking_mode must be one of", "thinking_mode", None),
    ("reasoning-effort", CHAT, {"messages": HELLO, "reasoning_effort": "extreme"}, 400,
     "reasoning_effort must be one of", "reasoning_effort", None),
    ("template-kwargs", CHAT, {"messages": HELLO, "chat_template_kwargs": "x"}, 400,
     "chat_template_kwargs must be an object", "chat_template_kwargs", None),
    ("template-refuses", CHAT, {"messages": [{"role": "tool", "content": "x"}]}, 400, "chat template refused",
     None, None),
    ("content-missing", CHAT, {"messages": [{"role": "user"}]}, 400, "must be given for role 'user'",
     "messages[0].content", None),
    ("model-type", CHAT, {"messages": HELLO, "model": 5}, 400, "model must be of type str", "model", None),
    ("n", CHAT, {"messages": HELLO, "n": 2}, 400, "n must be 1", "n", None),
    ("adapters", CHAT, {"messages": HELLO, "adapters": "lora"}, 400, "not supported", "adapters", None),
    ("draft-model", CHAT, {"messages": HELLO, "draft_model": "small"}, 400, "not supported", "draft_model", None),
    ("include-usage", CHAT, {"messages": HELLO, "stream": True, "stream_options": {"include_usage": "yes"}}, 400,
     "include_usage must be true or false", "stream_options.include_usage", None),
    ("stream-options", CHAT, {"messages": HELLO, "stream_options": 3}, 400, "stream_options must be an object",
     "stream_options", None),
    ("repetition-penalty", CHAT, {"messages": HELLO, "repetition_penalty": -1}, 400, "must be at least 0",
     "repetition_penalty", None),
    ("tool-arguments", CHAT, {"messages": [{"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "f", "arguments": "{bad"}}]}]}, 400, "arguments is not JSON", None, None),
    ("max-completion-tokens", CHAT, {"messages": HELLO, "max_completion_tokens": 0}, 400,
     "max_tokens must be at least 1", "max_tokens", None),
    ("prompt-type", "/v1/completions", {"prompt": 7}, 400, "prompt must be a string", "prompt", None),
    ("bad-json", CHAT, b"{not json", 400, "Invalid JSON", None, None),
    ("not-an-object", CHAT, b"[1, 2]", 400, "JSON dictionary", None, None),
    ("unknown-model", CHAT, {"messages": HELLO, "model": "/no/such/model"}, 404, "is not served here", "model",
     "model_not_found"),
    ("other-model-name", "/v1/completions", {"prompt": "hi", "model": "gpt-4o"}, 404, "this server serves: ", "model",
     "model_not_found"),
    ("unknown-path", "/v1/nowhere", {}, 404, "Not Found", None, None),
]


@pytest.mark.parametrize("name, path, body, status, message, param, code", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusal_status_and_body(server, name, path, body, status, message, param, code):
    got, text = request(server.port, "POST", path, body)
    assert got == status, text
    err = json.loads(text)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert message in err["message"]
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert err["param"] == param and err["code"] == code


def test_missing_content_length_and_unknown_model_id(server):
    got, text = request(server.port, "POST", CHAT, None)
    assert got == 411 and json.loads(text)["error"]["message"] == "Content-Length header is required"
    got, text = request(server.port, "GET", "/v1/models/nobody")
    assert got == 404 and json.loads(text)["error"]["type"] == "not_found_error"


def test_openai_client_sees_the_context_refusal(server):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="default_model", messages=LONG)
    assert info.value.code == "context_length_exceeded" and info.value.param == "messages"
    assert "the model's context holds 400" in info.value.message
    # the server goes on serving
    r = client.chat.completions.create(model="default_model", messages=HELLO, max_tokens=2)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2


def test_reply_stops_at_the_context_limit(server, no_eos):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="none", max_retries=0)
    r = client.chat.completions.create(model="default_model", messages=HELLO, max_tokens=5000,
                                       extra_body={"logit_bias": no_eos})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens + r.usage.completion_tokens == CONTEXT


def test_streamed_reply_ends_with_length_and_done_at_the_limit(server, no_eos):
    body = {"messages": HELLO, "max_tokens": 5000, "stream": True, "logit_bias": no_eos,
            "stream_options": {"include_usage": True}}
    got, text = request(server.port, "POST", CHAT, body)
    assert got == 200
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    reasons = [c["choices"][0].get("finish_reason") for c in chunks if c.get("choices")]
    assert reasons[-1] == "length" and reasons.count("length") == 1
    usage = next(c["usage"] for c in reversed(chunks) if c.get("usage"))
    assert usage["prompt_tokens"] + usage["completion_tokens"] == CONTEXT


def test_models_listed_without_a_hugging_face_cache(server, ckpt, tmp_path, monkeypatch):
    import huggingface_hub.utils._cache_manager as cache_manager

    monkeypatch.setattr(cache_manager, "HF_HUB_CACHE", str(tmp_path / "no-cache-here"))
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="none", max_retries=0)
    ids = [m.id for m in client.models.list()]
    assert str(ckpt.resolve()) in ids
    got, text = request(server.port, "GET", f"/v1/models/{ckpt.name}")
    assert got == 200 and json.loads(text)["id"] == str(ckpt.resolve())
