"""Who may use `minimax-m3 server` (serving/access.py): CORS origins (localhost by default),
the API key (--api-key or MINIMAX_M3_API_KEY) on every endpoint, and the refusal to listen
on a non-loopback address without a key."""

from __future__ import annotations

import argparse
import http.client
import json

import openai
import pytest

from minimax_m3_mlx import synthetic
from minimax_m3_mlx.cli import main as cli_main
from minimax_m3_mlx.serving.access import API_KEY_ENV, origin_allowed, settle

KEY = "sk-test-4f1c"
PAGE = "https://app.example.com"
HELLO = [{"role": "user", "content": "Hello!"}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("access_server")
    config = synthetic.tiny_config()
    synthetic.write_checkpoint(path, config, synthetic.random_weights(config, seed=8), "original")
    return path


@pytest.fixture(scope="module")
def server(ckpt):
    from minimax_m3_mlx.serving.server import Server, setup_arg_parser

    srv = Server(setup_arg_parser().parse_args(["--model", str(ckpt), "--port", "0", "--max-tokens", "4",
                                                "--api-key", KEY, "--allowed-origins", PAGE + "/"])).start()
    yield srv
    srv.shutdown()


def request(server, method, path, headers=None, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    data = json.dumps(body).encode() if body is not None else None
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    raw = r.read()
    conn.close()
    return r.status, dict(r.getheaders()), (json.loads(raw) if raw else None)


CHAT = ("POST", "/v1/chat/completions", {"model": "default_model", "messages": HELLO, "max_tokens": 2})
ENDPOINTS = [("GET", "/v1/models", None), ("GET", "/health", None), CHAT,
             ("POST", "/v1/completions", {"model": "default_model", "prompt": "hi", "max_tokens": 2})]


@pytest.mark.parametrize("method,path,body", ENDPOINTS, ids=[e[1] for e in ENDPOINTS])
@pytest.mark.parametrize("auth", [None, "Bearer wrong", f"Basic {KEY}", "Bearer"])
def test_key_required_on_every_endpoint(server, method, path, body, auth):
    status, headers, reply = request(server, method, path, {"Authorization": auth} if auth else {}, body)
    assert status == 401 and headers.get("WWW-Authenticate") == "Bearer"
    assert set(reply) == {"error"} and set(reply["error"]) == {"message", "type", "param", "code"}
    assert reply["error"]["type"] == "invalid_request_error" and reply["error"]["code"] == "invalid_api_key"
    assert ("didn't provide an API key" if auth is None else "Incorrect API key") in reply["error"]["message"]


@pytest.mark.parametrize("method,path,body", ENDPOINTS, ids=[e[1] for e in ENDPOINTS])
def test_right_key_is_served(server, method, path, body):
    status, _, reply = request(server, method, path, {"Authorization": f"Bearer {KEY}"}, body)
    assert status == 200, reply


def test_openai_client(server):
    base = f"http://127.0.0.1:{server.port}/v1"
    good = openai.OpenAI(base_url=base, api_key=KEY, max_retries=0, timeout=60)
    assert good.chat.completions.create(model="default_model", messages=HELLO, max_tokens=2).choices
    bad = openai.OpenAI(base_url=base, api_key="sk-nope", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model="default_model", messages=HELLO, max_tokens=2)
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"


@pytest.mark.parametrize("origin", ["http://localhost:5173", "http://127.0.0.1", "https://[::1]:8443", PAGE])
def test_allowed_origin(server, origin):
    method, path, body = CHAT
    status, headers, _ = request(server, method, path, {"Origin": origin, "Authorization": f"Bearer {KEY}"}, body)
    assert status == 200 and headers["Access-Control-Allow-Origin"] == origin and headers["Vary"] == "Origin"
    # the browser's preflight carries no credentials
    status, headers, _ = request(server, "OPTIONS", path, {"Origin": origin, "Access-Control-Request-Method": "POST",
                                                           "Access-Control-Request-Headers": "authorization"})
    assert status == 204 and headers["Access-Control-Allow-Origin"] == origin
    assert "Authorization" in headers["Access-Control-Allow-Headers"] and "POST" in headers["Access-Control-Allow-Methods"]


@pytest.mark.parametrize("origin", ["https://evil.example", "http://localhost.evil.example", "null",
                                    "https://app.example.com.evil.example"])
@pytest.mark.parametrize("method", ["POST", "OPTIONS"])
def test_denied_origin(server, origin, method):
    _, path, body = CHAT
    status, headers, reply = request(server, method, path, {"Origin": origin, "Authorization": f"Bearer {KEY}"},
                                     body if method == "POST" else None)
    assert status == 403 and "Access-Control-Allow-Origin" not in headers
    assert reply["error"]["code"] == "origin_not_allowed" and origin in reply["error"]["message"]


def test_origin_rules():
    assert origin_allowed("http://localhost:3000", []) and origin_allowed("https://127.0.0.1", [])
    assert not origin_allowed("https://example.com", []) and not origin_allowed("file://", [])
    assert origin_allowed("https://example.com", ["*"]) and origin_allowed("null", ["*"])
    assert origin_allowed("https://example.com", ["https://example.com"])
    assert not origin_allowed("http://example.com", ["https://example.com"])  # the scheme is part of it


def _args(**kw):
    return argparse.Namespace(**{"host": "127.0.0.1", "api_key": None, "insecure": False, **kw})


def test_settle_key_and_host():
    args = _args()
    settle(args, environ={API_KEY_ENV: "from-env"})
    assert args.api_key == "from-env"
    args = _args(api_key="given")
    settle(args, environ={API_KEY_ENV: "from-env"})
    assert args.api_key == "given"  # the flag wins
    for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"):
        settle(_args(host=host), environ={})  # loopback: no key needed
    for host in ("0.0.0.0", "::", "192.168.1.20"):
        with pytest.raises(ValueError, match=f"--host {host} is reachable from other machines and no API key"):
            settle(_args(host=host), environ={})
        settle(_args(host=host, insecure=True), environ={})
        settle(_args(host=host), environ={API_KEY_ENV: KEY})
    with pytest.raises(ValueError, match="--api-key is empty"):
        settle(_args(api_key=" "), environ={})


def test_cli_refuses_open_host(ckpt, capsys, monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert cli_main(["server", "--model", str(ckpt), "--host", "0.0.0.0", "--port", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minimax-m3 server: error: --host 0.0.0.0 is reachable")
    assert "--insecure" in err[0] and API_KEY_ENV in err[0]
