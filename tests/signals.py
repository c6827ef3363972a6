"""Ctrl-C for the processes a test starts, as a user's terminal gives it."""

import signal


def sigint_as_in_a_terminal():
    """Popen's preexec_fn: SIGINT (and SIGHUP, SIGTERM) back to their defaults in the child.

    A shell that runs a job in the background (as a CI runner may) starts it with SIGINT
    ignored; every child inherits that, and Python then never raises KeyboardInterrupt,
    so a test that presses Ctrl-C would wait for nothing.
    """
    # nohup, and runners started under it, ignore SIGHUP the same way.
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
