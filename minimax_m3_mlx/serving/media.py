"""Where the server may read a request's images from.

mlx-lm's server fetches every http(s) image URL a request names, so any client could make
the server send requests to hosts on its LAN (or read what they answer through the model).
Here, before a request is queued, each image part is turned into a `data:` URL or refused:

- `data:` URLs are taken as they are;
- http(s) URLs only with `--allow-remote-media`; then each fetch has a timeout
  (`--media-timeout`, for the whole fetch, not each read), a byte cap (`--max-media-bytes`)
  and follows no redirect to another host (nor another scheme than http/https);
- local paths and `file://` URLs only under `--allowed-media-dir DIR` (after resolving
  symlinks and `..`, so a link cannot lead outside it).

Each refusal is a 400 naming the flag that would allow it. The handler thread reads the
bytes, so under mlx.launch every rank gets the same data URL (as mlx-lm inlines its fetches).
"""

from __future__ import annotations

import argparse
import base64
import mimetypes
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import List, Optional
from urllib.parse import unquote, urlsplit

from mlx_lm.server import _image_url

from ..arg_types import positive_float, size
from .http_errors import RequestError

CHUNK = 64 * 1024


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-remote-media", action="store_true",
                   help="fetch http(s) image URLs of requests (default: only data: URLs; the server would "
                        "otherwise send requests wherever a client points it)")
    p.add_argument("--allowed-media-dir", action="append", default=[], metavar="DIR",
                   help="read local image paths and file:// URLs under DIR (repeatable; default: none)")
    p.add_argument("--media-timeout", type=positive_float, default=10.0,
                   help="seconds one remote image may take to fetch (default: 10)")
    p.add_argument("--max-media-bytes", type=size, default="20MB",
                   help="most bytes of one image, fetched or read (default: 20MB)")


class MediaRefused(RequestError):
    def __init__(self, message: str, param: str, code: str = "invalid_image_url"):
        super().__init__(message, param=param, code=code)


class _SameHost(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        old, new = urlsplit(req.full_url), urlsplit(newurl)
        if new.scheme not in ("http", "https") or (new.hostname, new.port) != (old.hostname, old.port):
            raise urllib.error.URLError(f"redirected to another host ({new.scheme}://{new.netloc})")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener():
    # No file://, ftp:// or data: handlers reachable through a redirect; the environment's proxies stay.
    return urllib.request.build_opener(_SameHost)


def _read_capped(stream, cap: int, deadline: Optional[float], what: str, param: str) -> bytes:
    chunks, n = [], 0
    while True:
        if deadline is not None and time.monotonic() > deadline:
            raise MediaRefused(f"{what}: took longer than --media-timeout", param, "media_timeout")
        chunk = stream.read(CHUNK)
        if not chunk:
            return b"".join(chunks)
        n += len(chunk)
        if n > cap:
            raise MediaRefused(f"{what}: larger than --max-media-bytes ({cap} bytes)", param, "media_too_large")
        chunks.append(chunk)


def _fetch(url: str, args, param: str) -> str:
    if not args.allow_remote_media:
        raise MediaRefused(f"{param}: http(s) image URLs are refused: send the image as a data: URL, or start "
                           "the server with --allow-remote-media", param, "remote_media_not_allowed")
    deadline = time.monotonic() + args.media_timeout
    try:
        with _opener().open(url, timeout=args.media_timeout) as response:
            mime = response.headers.get_content_type()
            data = _read_capped(response, args.max_media_bytes, deadline, f"{param}: {url}", param)
    except MediaRefused:
        raise
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = f"HTTP {e.code} {e.reason}" if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", e)
        raise MediaRefused(f"{param}: cannot fetch {url}: {reason}", param, "media_fetch_failed") from None
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _read_local(url: str, args, param: str) -> str:
    path = Path(unquote(urlsplit(url).path) if url.startswith("file:") else url).expanduser()
    roots = [Path(d).expanduser().resolve() for d in args.allowed_media_dir]
    if not roots:
        raise MediaRefused(f"{param}: local image paths are refused: send the image as a data: URL, or start the "
                           "server with --allowed-media-dir DIR", param, "local_media_not_allowed")
    resolved = path.resolve() if path.is_absolute() else None
    if resolved is None or not any(resolved.is_relative_to(r) for r in roots):
        raise MediaRefused(f"{param}: {url} is not under the server's --allowed-media-dir "
                           f"({', '.join(map(str, roots))}); paths must be absolute", param, "local_media_not_allowed")
    if not resolved.is_file():
        raise MediaRefused(f"{param}: {url}: no such file", param)
    with open(resolved, "rb") as f:
        data = _read_capped(f, args.max_media_bytes, None, f"{param}: {url}", param)
    mime = mimetypes.guess_type(resolved.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_parts(messages) -> List[tuple]:
    """[(param, part, url)] of every image part of a checked message list."""
    out = []
    for i, m in enumerate(messages):
        content = m.get("content")
        for j, part in enumerate(content if isinstance(content, list) else []):
            url = _image_url(part) if isinstance(part, dict) else None
            if url is not None:
                out.append((f"messages[{i}].content[{j}]", part, url))
    return out


def inline_images(messages, args) -> None:
    """Replace each image part's URL by a data: URL (in place), or raise MediaRefused."""
    for param, part, url in image_parts(messages):
        if not isinstance(url, str):
            raise MediaRefused(f"{param}: the image URL must be a string", param)
        scheme = urlsplit(url).scheme.lower()
        if scheme == "data":
            continue
        if scheme in ("http", "https"):
            data = _fetch(url, args, param)
        elif scheme in ("file", "") or url.startswith("/"):
            data = _read_local(url, args, param)
        else:
            raise MediaRefused(f"{param}: unsupported image URL scheme {scheme!r} (data:, http(s) with "
                               "--allow-remote-media, or a file under --allowed-media-dir)", param)
        part.clear()
        part.update(type="image_url", image_url={"url": data})
