"""How `minimax-m3 server` ends: Ctrl-C, SIGTERM or SIGHUP, in one process or under mlx.launch.

- The rank that listens (or the one process) takes SIGTERM (a service manager stopping it)
  and SIGHUP (its terminal or ssh session gone) as it takes Ctrl-C: the HTTP server stops,
  the reply in progress finishes, and under mlx.launch rank 0 then shares its stop with the
  other ranks (cluster.py), so that every rank ends after the same last collective. A signal
  that was ignored when the server started (nohup, a shell's background job) stays ignored.
- The other ranks ignore all three and end on rank 0's stop. Ended by a signal of their own
  they would leave rank 0 in a collective nobody joins; and a terminal's Ctrl-C or a service
  manager's SIGTERM reaches every rank anyway. If rank 0 dies instead, their next collective
  fails and they end.
- Started by a local mlx.launch, rank 0 also ends when the launcher does: mlx.launch dies at
  once on SIGTERM (`kill PID`, launchd stopping it) and would leave its ranks running, rank 0
  still holding the port. (A rank on another host runs under ssh, which ends it with SIGHUP.)
- The threads that run collectives (the generation thread) and this module's watcher block
  the three signals, so that the kernel hands them to the main thread: on another thread a
  handled signal interrupts the ring backend's socket calls.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
WATCH_SECONDS = 0.5  # how often rank 0 looks for its launcher


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def install(group) -> None:
    """From the main thread of `minimax-m3 server`, before the model loads (a signal during the
    load ends it too)."""
    if group.rank() != 0:
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        return
    for sig in SIGNALS[1:]:
        if signal.getsignal(sig) == signal.SIG_DFL:
            signal.signal(sig, _interrupt)
    if group.size() > 1 and _parent_is_launcher():
        threading.Thread(target=_watch_launcher, args=(os.getppid(),), name="launcher-watch", daemon=True).start()


def block_in_this_thread() -> None:
    """Keep SIGINT, SIGTERM and SIGHUP off the calling (non-main) thread."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)


def _parent_is_launcher() -> bool:
    try:
        parent = subprocess.run(["ps", "-ww", "-o", "command=", "-p", str(os.getppid())], capture_output=True,
                                text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return any(name in parent for name in ("mlx.launch", "mlx._distributed_utils.launch"))


def _watch_launcher(launcher: int) -> None:
    block_in_this_thread()
    while os.getppid() == launcher:  # a rank whose parent died is handed to another
        time.sleep(WATCH_SECONDS)
    os.kill(os.getpid(), signal.SIGTERM)
