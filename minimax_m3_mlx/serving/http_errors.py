"""The server's refusals in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

mlx-lm's handler writes `{"error": msg}` (or plain text) at each of its refusals; the
handler's output stream is wrapped so that every one of them, and ours, leaves in the
shape OpenAI's clients parse (issue #13 asks for the same).
"""

from __future__ import annotations

import json
import re
from typing import Optional


class RequestError(ValueError):
    """A refused request, with OpenAI's `param` and `code` for its error body, and its HTTP
    status (400 unless the request is fine but cannot be served now, e.g. 503)."""

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None, status: int = 400):
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


def openai_error(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    if param is None:  # our messages and mlx-lm's start with the field they refuse
        m = re.match(r"(?:malformed request: \w+: )?([a-z_]+(?:\[\d+\])?(?:\.[a-z_]+(?:\[\d+\])?)*) must ", message)
        param = m.group(1) if m else None
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 404:
        kind = "not_found_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class OpenAIErrorBodies:
    """The handler's output stream: an error body mlx-lm writes as `{"error": msg}` (or as
    plain text) leaves in OpenAI's shape. Everything else passes through untouched."""

    def __init__(self, handler, raw):
        self._handler, self._raw = handler, raw

    def write(self, data: bytes):
        status = getattr(self._handler, "_status", 200)
        if status >= 400 and data and self._handler._body_started:
            try:
                body = json.loads(data)
                message = body["error"] if isinstance(body, dict) else None
            except (ValueError, UnicodeDecodeError):
                message = data.decode(errors="replace")
            if isinstance(message, str):
                err = getattr(self._handler, "_error", None)
                data = json.dumps(openai_error(status, message, getattr(err, "param", None),
                                              getattr(err, "code", None))).encode()
        return self._raw.write(data)

    def __getattr__(self, name):
        return getattr(self._raw, name)
