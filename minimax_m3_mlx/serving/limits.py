"""How much one client may ask of the server: the body size, the images in one request, and
the requests waiting for the model.

mlx-lm's server reads any body whole before looking at it (an 80 MB body held a handler for
minutes) and queues every request without bound (a burst of long prompts then waits for
ever, and every client times out). Here, each in OpenAI's error shape:

- a body over `--max-body-bytes` is refused with 413 before it is read, and the connection
  is closed (the unread bytes would otherwise be taken for the next request);
- a chat with more than `--max-images` image parts is a 400;
- when `--decode-concurrency` requests are being answered and `--max-queued-requests` more
  wait, the next one gets 429 with `Retry-After`, as OpenAI's API answers a client that
  must back off;
- a log line is cut to `LOG_CHARS` (mlx-lm logs a malformed body whole, at ERROR: up to
  --max-body-bytes written to the terminal for one bad request).
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time

from ..arg_types import non_negative_int, size
from .http_errors import RequestError, openai_error

RETRY_AFTER_SECONDS = 1
LOG_CHARS = 2000
DRAIN_SECONDS = 5  # how long a refused body is read and dropped, so that its client reads the 413


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-body-bytes", type=size, default="64MB",
                   help="largest request body (default: 64MB; a larger one gets 413 unread)")
    p.add_argument("--max-images", type=non_negative_int, default=16,
                   help="most images in one request (default: 16)")
    p.add_argument("--max-queued-requests", type=non_negative_int, default=64,
                   help="most requests waiting beyond the --decode-concurrency being answered; the next gets "
                        "429 with Retry-After (default: 64)")


def check_image_count(count: int, args) -> None:
    if count > args.max_images:
        raise RequestError(f"messages: {count} images in one request; this server takes at most {args.max_images} "
                           "(its --max-images)", param="messages", code="too_many_images")


class Admission:
    """The requests the server holds (answered or waiting), bounded."""

    def __init__(self, args):
        self.capacity = args.decode_concurrency + args.max_queued_requests
        self._held, self._lock = 0, threading.Lock()

    def enter(self) -> bool:
        with self._lock:
            if self._held >= self.capacity:
                return False
            self._held += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self._held -= 1


class RequestLimits:
    """Mixin for mlx_lm.server.APIHandler (its subclass sets `admission`): the body size
    and the queue bound."""

    admission: Admission

    def _send_limit(self, status: int, message: str, code: str, param=None, headers=()) -> None:
        body = json.dumps(openai_error(status, message, param, code)).encode()
        self._error = None
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self._set_cors_headers()
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def do_POST(self):
        limit = self.response_generator.cli_args.max_body_bytes
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0  # mlx-lm refuses it
        if length > limit:
            self._send_limit(413, f"the request body has {length} bytes; this server takes at most {limit} "
                                  "(its --max-body-bytes)", "request_too_large")
            self._drain(length)
            return
        super().do_POST()

    def _drain(self, length: int) -> None:
        """Drop the refused body unparsed (a client that is still sending it would otherwise
        see the connection reset instead of the 413), for a bounded time; then close."""
        self.close_connection = True
        deadline = time.monotonic() + DRAIN_SECONDS
        try:
            self.connection.settimeout(DRAIN_SECONDS)
            while length > 0 and time.monotonic() < deadline:
                chunk = self.rfile.read1(min(length, 1 << 20))
                if not chunk:
                    break
                length -= len(chunk)
        except OSError:
            pass

    def handle_completion(self, request, stop_words):
        if not self.admission.enter():
            self._send_limit(429, f"the server is busy: {self.admission.capacity} requests are being answered or "
                                  "waiting (its --decode-concurrency and --max-queued-requests); retry later",
                             "too_many_requests", headers=[("Retry-After", str(RETRY_AFTER_SECONDS))])
            return
        try:
            super().handle_completion(request, stop_words)
        finally:
            self.admission.leave()


class ShortLogLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if len(message) > LOG_CHARS:
            record.msg, record.args = f"{message[:LOG_CHARS]}... ({len(message)} characters)", ()
        return True


def shorten_log_lines() -> None:
    """On the handlers logging.basicConfig made (the server's main)."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(ShortLogLines())
