"""The server under `mlx.launch`: rank 0 serves HTTP, every other rank follows its requests.

mlx-lm's generation loop already runs on every rank and shares each request rank 0 takes
from its queue (pickled, through an all-sum), so that all ranks tokenize the same prompt
with the same sampling settings and step through the same tensor- or pipeline-parallel
forward passes; random states are seeded alike once at start. What it lacks, and this
mixin adds to the response generator:

- an end: rank 0 shares a "stop" when it shuts down, and the other ranks end their loop
  on it (they ignore the signals that end rank 0: leaving alone would leave rank 0 in an
  all-sum nobody joins; see shutdown.py);
- agreement before the forward pass: each rank prepares the request (template, tokens,
  images) and the ranks then share whether that worked. Where it failed on any rank, it
  fails on all of them with the same error, which rank 0's client gets as a 500 in
  OpenAI's shape; the ranks then wait for the next request together instead of one rank
  sitting in a collective the others never reach;
- a client that leaves mid-reply: mlx-lm stops rank 0 alone (NotImplementedError under
  distributed), which would desynchronise the ranks' collectives. Here the ranks finish
  the reply together and the text is dropped.

A rank that dies (out of memory inside a forward pass, a killed process) is not
recoverable this way: the others end with a line naming it (liveness.py).
"""

from __future__ import annotations

import re
from queue import Queue
from typing import Optional

import mlx.core as mx
import numpy as np
from mlx_lm.server import GenerationContext, _image_parts

from . import liveness
from .shutdown import block_in_this_thread

STOP = "stop"  # what rank 0 shares instead of a request when it shuts down
_MESSAGE_BYTES = 512  # of each rank's error message, in the agreement


class ClusterError(RuntimeError):
    """A request that could not be prepared on some rank (the server answers 500)."""


class MediaError(ValueError):
    """A request whose images could not be prepared, e.g. one that does not decode (the
    client's own fault: the server answers 400)."""


class _KeepGoing:
    """A request's response queue on rank 0 under distributed: the request's context
    ignores the client's leaving, so that every rank generates the same steps."""

    def __init__(self, queue: Queue):
        self._queue = queue

    def put(self, item, *args, **kwargs):
        if isinstance(item, GenerationContext):
            item.stop = lambda: None
        self._queue.put(item, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._queue, name)


class ClusterFollowing:
    """Mixin for mlx_lm.server.ResponseGenerator: a clean end and per-request agreement
    across the ranks of an mlx.launch run; in one process, only a request whose images fail
    is marked as the client's fault (MediaError)."""

    _stop_shared = False

    @property
    def _size(self) -> int:
        return mx.distributed.init().size()

    @property
    def follows(self) -> bool:
        """Whether this rank follows rank 0 (takes no requests of its own)."""
        return self._is_distributed and self._rank != 0

    def _share_request(self, request):
        if not self._is_distributed:
            return request
        if self._rank == 0:
            if self._stop:
                self._share_stop()
                return None
            if request is not None:
                request = (_KeepGoing(request[0]), *request[1:])
            return super()._share_request(request)
        shared = self._share_object(None)
        if shared == STOP:
            self._stop, self._stop_shared = True, True
            liveness.ending()
            return None
        return None if shared is None else (Queue(), *shared)

    def _share_stop(self) -> None:
        if not self._stop_shared:
            self._stop_shared = True
            self._share_object(STOP)
            liveness.ending()

    def _run_generate(self):  # the generation thread
        block_in_this_thread()  # the signals that end the server go to the main thread (shutdown.py)
        super()._run_generate()

    def _generate(self):
        try:
            super()._generate()
        finally:
            if self._is_distributed and self._rank == 0:
                self._share_stop()  # the loop may have ended between two shares

    def stop_and_join(self):
        if self.follows:
            self.join()  # ends when rank 0 shares its stop
        else:
            super().stop_and_join()

    def _tokenize(self, tokenizer, request, args):
        try:
            prepared, error = super()._tokenize(tokenizer, request, args), None
        except Exception as e:
            images = request.request_type == "chat" and any(_image_parts(request.messages))
            prepared, error = None, MediaError(f"the request's images: {e}") if images else e
        if not self._is_distributed:
            if error is not None:
                raise error
            return prepared
        failed = self._agree(error)
        if failed:
            # Failed here alone, or on every rank alike (the request's own fault: a bad image).
            alike = len(failed) == self._size and len({re.sub(r"0x[0-9a-f]+", "", m) for _, m in failed}) == 1
            if error is not None and (len(failed) == 1 or alike):
                raise error
            raise ClusterError("; ".join(f"rank {r}: {m}" for r, m in failed))
        return prepared

    def _agree(self, error: Optional[BaseException]) -> list:
        """[(rank, message)] of the ranks where preparing the request failed (every rank
        gets the same list)."""
        rows = np.zeros((self._size, _MESSAGE_BYTES + 1), dtype=np.uint8)
        if error is not None:
            text = f"{type(error).__name__}: {error}".encode()[:_MESSAGE_BYTES]
            rows[self._rank, 0] = 1
            rows[self._rank, 1:1 + len(text)] = np.frombuffer(text, dtype=np.uint8)
        every = np.array(mx.distributed.all_sum(mx.array(rows)))
        return [(rank, bytes(row[1:]).rstrip(b"\0").decode(errors="replace"))
                for rank, row in enumerate(every) if row[0]]

