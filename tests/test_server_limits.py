"""What a request may make the server do, and how much of it: the served model's names
(routing.py), where images may come from (media.py), and the limits on the body, the
images and the queue (limits.py). One server on a tiny checkpoint with a vision tower;
remote images come from an http.server on 127.0.0.1 (nothing here reaches the network).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import http.server
import io
import json
import sys
import threading
from pathlib import Path

import numpy as np
import openai
import pytest

from minimax_m3_mlx import synthetic

sys.path.insert(0, str(Path(__file__).parent))
from test_server_cluster import _images_available  # noqa: E402

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "Hello!"}]
MEDIA_CAP = 100_000


def _png(seed: int, shape=(60, 90, 3)) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _image_chat(*urls):
    return [{"role": "user", "content": [*({"type": "image_url", "image_url": {"url": u}} for u in urls),
                                         {"type": "text", "text": "What is this?"}]}]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """(allowed folder with image.png, the PNG's bytes, base URL of a local http.server)."""
    folder = tmp_path_factory.mktemp("allowed_media")
    png = _png(4)
    (folder / "image.png").write_bytes(png)
    big = b"\x89PNG" + bytes(MEDIA_CAP + 10)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            port = self.server.server_address[1]
            routes = {"/image.png": (200, png, {}), "/big.png": (200, big, {}),
                      "/same": (302, b"", {"Location": f"http://127.0.0.1:{port}/image.png"}),
                      "/other": (302, b"", {"Location": f"http://localhost:{port}/image.png"})}
            status, body, headers = routes.get(self.path, (404, b"", {}))
            self.send_response(status)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield folder, png, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, media):
    from reference import build_reference
    from minimax_m3_mlx.serving.server import Server, setup_arg_parser

    if not _images_available():
        pytest.skip("the vision extra is not installed")
    path = tmp_path_factory.mktemp("limits_server")
    config = synthetic.tiny_config()
    weights = synthetic.random_weights(config, seed=21)
    synthetic.write_checkpoint(path, config, {**weights, **build_reference(config, weights)[1]}, "original")
    srv = Server(setup_arg_parser().parse_args(
        ["--model", str(path), "--port", "0", "--max-tokens", "6", "--served-model-name", "minimax-m3,mm3",
         "--allow-remote-media", "--allowed-media-dir", str(media[0]), "--max-media-bytes", str(MEDIA_CAP),
         "--max-images", "2", "--max-body-bytes", "1MB", "--decode-concurrency", "1",
         "--max-queued-requests", "0"])).start()
    yield srv
    srv.shutdown()


def _client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="none", max_retries=0, timeout=120)


def _post(port, body, path=CHAT, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", path, body=body if isinstance(body, bytes) else json.dumps(body).encode(),
                 headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    out = resp.status, dict(resp.getheaders()), resp.read().decode()
    conn.close()
    return out


def _refused(port, body, status, code, *words):
    got, _, text = _post(port, body)
    assert got == status, text
    err = json.loads(text)["error"]
    assert err["code"] == code and all(w in err["message"] for w in words), err
    return err


def test_served_names_and_nothing_else(server):
    client = _client(server)
    ids = [m.id for m in client.models.list()]
    model_path = server.args.model
    assert ids == ["minimax-m3", "mm3", str(Path(model_path).resolve())]
    replies = {client.chat.completions.create(model=name, messages=HELLO).choices[0].message.content
               for name in ("minimax-m3", "mm3", Path(model_path).name, str(model_path), "default_model")}
    assert len(replies) == 1
    for name in ("gpt-4o", "/tmp", str(Path(model_path).parent)):
        with pytest.raises(openai.NotFoundError) as info:
            client.chat.completions.create(model=name, messages=HELLO)
        assert info.value.code == "model_not_found" and "minimax-m3, mm3" in info.value.message
    assert client.models.retrieve("mm3").id == "mm3"
    assert client.models.retrieve(ids[2]).id == ids[2]  # the absolute path
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    with pytest.raises(ValueError, match="not served here"):  # the provider itself loads nothing else
        server.provider.load(str(Path(model_path).parent))


def test_image_sources(server, media):
    folder, png, base = media
    client = _client(server)

    def reply(url):
        return client.chat.completions.create(model="mm3", messages=_image_chat(url)).choices[0].message.content

    inline = reply(_data_url(png))
    assert reply(f"{base}/image.png") == inline
    assert reply(f"{base}/same") == inline  # a redirect on the same host
    assert reply(str(folder / "image.png")) == inline
    assert reply((folder / "image.png").as_uri()) == inline
    port = server.port
    _refused(port, {"messages": _image_chat(f"{base}/other")}, 400, "media_fetch_failed", "another host")
    _refused(port, {"messages": _image_chat(f"{base}/big.png")}, 400, "media_too_large", "--max-media-bytes")
    _refused(port, {"messages": _image_chat(f"{base}/missing.png")}, 400, "media_fetch_failed", "404")
    _refused(port, {"messages": _image_chat("/etc/hostname")}, 400, "local_media_not_allowed", "--allowed-media-dir")
    _refused(port, {"messages": _image_chat(f"{folder}/../{folder.name}/../image.png")}, 400,
             "local_media_not_allowed")
    _refused(port, {"messages": _image_chat("ftp://127.0.0.1/x.png")}, 400, "invalid_image_url", "scheme 'ftp'")
    err = _refused(port, {"messages": _image_chat(*[_data_url(png)] * 3)}, 400, "too_many_images", "--max-images")
    assert err["param"] == "messages"


def test_default_media_refusals_name_the_flag(media):
    from minimax_m3_mlx.serving.media import MediaRefused, inline_images

    folder, png, base = media
    args = argparse.Namespace(allow_remote_media=False, allowed_media_dir=[], media_timeout=5.0,
                              max_media_bytes=MEDIA_CAP)
    for url, flag in ((f"{base}/image.png", "--allow-remote-media"), (str(folder / "image.png"), "--allowed-media-dir"),
                      ((folder / "image.png").as_uri(), "--allowed-media-dir")):
        with pytest.raises(MediaRefused, match=flag) as info:
            inline_images(_image_chat(url), args)
        assert info.value.param == "messages[0].content[0]" and info.value.status == 400
    messages = _image_chat(_data_url(png))
    inline_images(messages, args)
    assert messages == _image_chat(_data_url(png))


def test_body_size(server):
    got, headers, text = _post(server.port, b"{" + b" " * 2_000_000 + b"}")
    assert got == 413, text
    assert json.loads(text)["error"]["code"] == "request_too_large"
    assert _client(server).chat.completions.create(model="mm3", messages=HELLO).choices  # still serving


def test_queue_bound_answers_429_with_retry_after(server):
    client = _client(server)
    no_eos = {str(t): -100.0 for t in server.provider.tokenizer.eos_token_ids}  # held until its 60 tokens
    stream = client.chat.completions.create(model="mm3", messages=HELLO, max_tokens=60, stream=True,
                                            extra_body={"logit_bias": no_eos})
    chunks = iter(stream)
    next(chunks)  # the one request the server holds (--decode-concurrency 1, --max-queued-requests 0)
    got, headers, text = _post(server.port, {"messages": HELLO, "max_tokens": 2})
    assert got == 429 and headers.get("Retry-After") == "1", text
    assert json.loads(text)["error"]["code"] == "too_many_requests"
    for _ in chunks:  # the held request ends normally
        pass
    assert client.chat.completions.create(model="mm3", messages=HELLO, max_tokens=2).choices


def test_long_log_lines_are_cut():
    """mlx-lm logs a malformed body whole: a line of the server's log stays short."""
    import logging

    from minimax_m3_mlx.serving.limits import LOG_CHARS, ShortLogLines

    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "JSONDecodeError - Raw body: %s", ("y" * 10**6,), None)
    ShortLogLines().filter(record)
    assert len(record.getMessage()) < LOG_CHARS + 50 and "(1000028 characters)" in record.getMessage()
