"""Ctrl-C for the processes a test starts, as a user's terminal gives it."""

import signal


def sigint_as_in_a_terminal():
    """Popen's preexec_fn: SIGINT back to its default in the child.

    A shell that runs a job in the background (as a CI runner may) starts it with SIGINT
    ignored; every child inherits that, and Python then never raises KeyboardInterrupt,
    so a test that presses Ctrl-C would wait for nothing.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
