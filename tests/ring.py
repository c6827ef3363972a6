"""`mlx.launch --backend ring` on localhost, on ports that are free right now.

mlx.launch's ring backend listens on a fixed starting port by default, so two test runs
on one machine (or a port left in TIME_WAIT) would meet on it and hang; each launch
here asks for a base port whose consecutive ports are all free.
"""

from __future__ import annotations

import random
import shutil
import socket
import sys
from pathlib import Path


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_base(n: int) -> int:
    for _ in range(200):
        base = random.randint(20000, 60000 - n)
        if all(_free(base + i) for i in range(n)):
            return base
    raise RuntimeError(f"no {n} consecutive free ports on 127.0.0.1")


def launch_args(n: int) -> list:
    """argv up to the program: the launcher, ring backend, `n` ranks, free ports, this python."""
    launcher = shutil.which("mlx.launch") or str(Path(sys.executable).parent / "mlx.launch")
    return [launcher, "--backend", "ring", "-n", str(n), "--starting-port", str(free_port_base(n)),
            "--python", sys.executable]
