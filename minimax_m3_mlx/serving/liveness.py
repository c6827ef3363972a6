"""Under mlx.launch: a rank that dies mid-request must not leave the others hanging.

The ring backend does not fail a collective whose peer has died: it prints `[ring] ...
failed` lines and the all-sum never returns, so rank 0 would keep its port open and answer
nobody, for ever, and mlx.launch would wait for it. Here each following rank holds one TCP
connection to rank 0 (rank 0 listens on a free port of the address the hostfile gives it,
and shares the port and a random token with the first collective). The kernel closes a
killed process's connections, so the other end learns of the death at once; TCP keepalive
covers a host that vanished. A rank that loses a peer prints one line naming it and exits
with status 1 at once, without running the collectives it would hang in; once the ranks
have shared the stop (`ending()`: a clean end, where every rank closes its connections),
only a rank still running `GRACE_SECONDS` later does.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import threading
import time
from typing import Optional

import mlx.core as mx
import numpy as np

from .shutdown import block_in_this_thread

GRACE_SECONDS = 10.0
CONNECT_SECONDS = 30.0
PROG = "minimax-m3 server"
_ending = threading.Event()


def ending() -> None:
    """The ranks have shared the stop (cluster.py): connections closing now are their clean end."""
    _ending.set()


def _rank0_address() -> Optional[str]:
    """Rank 0's address in mlx.launch's ring hostfile (None elsewhere: no watch)."""
    try:
        with open(os.environ["MLX_HOSTFILE"]) as f:
            hosts = json.load(f)
        return hosts[0][0].rsplit(":", 1)[0].strip("[]")
    except (KeyError, OSError, ValueError, IndexError, TypeError, AttributeError):
        return None


def _keepalive(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 20), ("TCP_KEEPALIVE", 20), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 4)):
        if hasattr(socket, name):  # Linux has KEEPIDLE, macOS KEEPALIVE
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def _lost(rank: int, why: str) -> None:
    """Called from a watch thread: end the process (after a clean stop, unless it ends by itself first)."""
    if _ending.is_set():
        time.sleep(GRACE_SECONDS)
    print(f"{PROG}: error: lost rank {rank} ({why}); the cluster cannot go on without it", file=sys.stderr,
          flush=True)
    os._exit(1)  # the other threads sit in collectives that never return: no clean exit exists


def _wait_closed(sock: socket.socket, rank: int) -> None:
    block_in_this_thread()
    try:
        while sock.recv(1):
            pass
        why = "its process ended"
    except OSError as e:
        why = f"its connection failed: {e.strerror or e}"
    _lost(rank, why)


def _serve(listener: socket.socket, token: bytes, followers: int) -> None:
    block_in_this_thread()
    listener.settimeout(None)
    seen = set()
    while len(seen) < followers:
        conn, _ = listener.accept()
        conn.settimeout(CONNECT_SECONDS)
        try:
            hello = conn.recv(64).decode(errors="replace").split()
            rank = int(hello[0])
        except (OSError, ValueError, IndexError):
            conn.close()
            continue
        if len(hello) != 2 or hello[1].encode() != token or rank in seen:  # not one of ours
            conn.close()
            continue
        seen.add(rank)
        conn.settimeout(None)
        _keepalive(conn)
        threading.Thread(target=_wait_closed, args=(conn, rank), name=f"watch-rank-{rank}", daemon=True).start()
    listener.close()


def start(group) -> None:
    """Every rank, from the main thread, before the generation thread starts: the same
    collective on all of them. Nothing to do in one process or without a ring hostfile."""
    if group.size() == 1:
        return
    host = _rank0_address()
    shared = np.zeros(3, dtype=np.int32)
    listener = None
    if group.rank() == 0 and host is not None:
        try:
            listener = socket.create_server((host, 0))
            token = secrets.randbits(31)
            shared[:] = (1, listener.getsockname()[1], token)
        except OSError:
            listener = None
    shared = np.array(mx.distributed.all_sum(mx.array(shared), group=group)).tolist()
    ok, port, token = shared
    if not ok:
        return
    token_text = str(token).encode()
    if group.rank() == 0:
        threading.Thread(target=_serve, args=(listener, token_text, group.size() - 1), name="rank-watch",
                         daemon=True).start()
        return
    try:
        sock = socket.create_connection((host, port), timeout=CONNECT_SECONDS)
        sock.sendall(str(group.rank()).encode() + b" " + token_text)
        sock.settimeout(None)
        _keepalive(sock)
    except OSError:  # rank 0 unreachable on that address (e.g. a ring without a route to it): no watch
        return
    threading.Thread(target=_wait_closed, args=(sock, 0), name="rank-watch", daemon=True).start()
