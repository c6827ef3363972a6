"""`minimax-m3 server` as one rank of an `mlx.launch` run, for tests/test_server_cluster.py.

    RANK_LOGS=FOLDER mlx.launch --backend ring -n 2 --python PY tests/dist_server.py SERVER-ARGS...

As the CLI, except that
- on the last rank preparing a request whose text holds FAIL_MARK raises: a failure on one
  rank only, which the server must turn into an error for that request's client while
  every rank goes on serving;
- each rank prints the widest batch its sparse caches have held so far ("batch width N");
- with RANK_LOGS set, each rank writes its output to FOLDER/rank<r>.log and ends it with
  ENDED and the exit code: the test reads every rank's end there, also once the launcher,
  which relays the output, has been interrupted or killed;
- SIGUSR1 prints every thread's stack (a test that finds a rank hanging asks for it);
- each rank prints its pid ("rank R pid P"), for a test that kills one.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys

import mlx.core as mx
import mlx_lm.server

from minimax_m3_mlx.cli import main
from minimax_m3_mlx.model.batch_cache import BatchSparseCache

FAIL_MARK = "please fail on the last rank"
ENDED = "dist_server ended with"


def _report_batch_width(original):
    """Print each new widest batch (the test reads it from the log: rows decoded together)."""
    widest = [1]

    def update_and_fetch(self, keys, values):
        if keys.shape[0] > widest[0]:
            widest[0] = keys.shape[0]
            print(f"rank {mx.distributed.init().rank()}: batch width {widest[0]}", flush=True)
        return original(self, keys, values)

    return update_and_fetch


def _failing_tokenize(original):
    def tokenize(self, tokenizer, request, args):
        if FAIL_MARK in repr(request):
            raise RuntimeError("injected failure")
        return original(self, tokenizer, request, args)

    return tokenize


if __name__ == "__main__":
    group = mx.distributed.init()
    BatchSparseCache.update_and_fetch = _report_batch_width(BatchSparseCache.update_and_fetch)
    if os.environ.get("RANK_LOGS"):
        log = os.open(os.path.join(os.environ["RANK_LOGS"], f"rank{group.rank()}.log"),
                      os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(log, 1)
        os.dup2(log, 2)
    print(f"rank {group.rank()} pid {os.getpid()}", flush=True)  # for a test that kills one rank
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    if group.size() > 1 and group.rank() == group.size() - 1:
        mlx_lm.server.ResponseGenerator._tokenize = _failing_tokenize(mlx_lm.server.ResponseGenerator._tokenize)
    code = main(["server", *sys.argv[1:]])
    print(f"{ENDED} {code}", flush=True)
    sys.exit(code)
