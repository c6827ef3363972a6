"""Who may use the server: CORS origins, an API key, and a refusal to listen openly.

mlx-lm's server allows every CORS origin and asks for no key: any web page open in the
user's browser can then drive the local model and read its replies, and on a LAN anyone
can. Here:

- browsers: only pages from localhost (http or https, any port) may call the server,
  unless `--allowed-origins` names more (`*`: any). A request that carries another
  Origin is refused with 403, preflight included: a browser would hide the reply from
  such a page anyway, but a "simple" POST would still run a generation for it;
- `--api-key KEY` (or MINIMAX_M3_API_KEY) requires `Authorization: Bearer KEY` on every
  endpoint (CORS preflights excepted: browsers send them without credentials); a wrong or
  missing key gets 401 in OpenAI's error shape, as OpenAI's own API answers;
- a `--host` that is not a loopback address needs a key, or `--insecure` to say that
  an open server is meant (we refuse rather than warn: a warning scrolls past, and the
  server would already be open to the network).
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import os
import socket
from typing import List
from urllib.parse import urlsplit

API_KEY_ENV = "MINIMAX_M3_API_KEY"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allowed-origins", type=lambda x: [o.strip().rstrip("/") for o in x.split(",") if o.strip()],
                   default=[], help="comma-separated CORS origins allowed besides localhost pages "
                                    "(e.g. https://app.example.com; '*': any page)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every request (default: ${API_KEY_ENV} if set)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without an API key (anyone who can reach it may use it)")


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is a loopback one ("" and 0.0.0.0 are not)."""
    if host.lower().strip("[]") in LOOPBACK_NAMES:
        return True
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def settle(args: argparse.Namespace, environ=os.environ) -> None:
    """Fill in the key from the environment; refuse an open non-loopback server (ValueError)."""
    if args.api_key is None:
        args.api_key = environ.get(API_KEY_ENV) or None
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key is empty")
    if not args.api_key and not args.insecure and not is_loopback(args.host):
        raise ValueError(f"--host {args.host} is reachable from other machines and no API key is set: "
                         f"give --api-key KEY (or set {API_KEY_ENV}), or --insecure to serve without one")


def origin_allowed(origin: str, allowed: List[str]) -> bool:
    if "*" in allowed or origin.rstrip("/") in allowed:
        return True
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and (parts.hostname or "") in LOOPBACK_NAMES


class AccessControl:
    """Mixin for mlx_lm.server.APIHandler: CORS by origin, and the API key."""

    def _access(self):
        return self.response_generator.cli_args

    def _set_cors_headers(self):
        origin = self.headers.get("Origin")
        if origin is not None and origin_allowed(origin, self._access().allowed_origins):
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
            # a wildcard would not cover Authorization (Fetch standard)
            self.send_header("Access-Control-Allow-Headers", "Authorization, Content-Type")
        self.send_header("Vary", "Origin")

    def _refuse(self, status: int, message: str, code: str) -> None:
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                     "code": code}}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if status == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        self._set_cors_headers()
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def _admitted(self, preflight: bool = False) -> bool:
        args = self._access()
        origin = self.headers.get("Origin")
        if origin is not None and not origin_allowed(origin, args.allowed_origins):
            self._refuse(403, f"origin {origin} is not allowed (the server's --allowed-origins)", "origin_not_allowed")
            return False
        if preflight or not args.api_key:
            return True
        given = self.headers.get("Authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), args.api_key.encode()):
            self._refuse(401, "Incorrect API key provided." if given else
                         "You didn't provide an API key: send 'Authorization: Bearer KEY'.", "invalid_api_key")
            return False
        return True

    def do_OPTIONS(self):
        if self._admitted(preflight=True):
            super().do_OPTIONS()

    def do_GET(self):
        if self._admitted():
            super().do_GET()

    def do_POST(self):
        if self._admitted():
            super().do_POST()

