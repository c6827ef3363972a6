"""`minimax-m3 <command>`: one entry point, one module per command.

Every command's errors end here: a mistake prints one line, `minimax-m3 CMD: error: ...`,
and exits non-zero; `--verbose` (anywhere on the command line) or MINIMAX_M3_VERBOSE=1
adds the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import traceback

# command -> (module, help). Each module has `main(argv: list[str] | None) -> int | None`.
COMMANDS = {
    "demo": ("minimax_m3_mlx.demo", "write a tiny MXFP8 checkpoint, load it and generate (no network)"),
    "convert": ("minimax_m3_mlx.convert", "convert a released checkpoint to an MLX model"),
    "generate": ("minimax_m3_mlx.generate", "generate text from a prompt"),
    "chat": ("minimax_m3_mlx.chat", "chat at the terminal"),
    "server": ("minimax_m3_mlx.server", "OpenAI-compatible server (mlx-lm's)"),
    "plan": ("minimax_m3_mlx.plan", "memory plan for one or more Macs"),
}
# What Ctrl-C means for a command, when it is more than "stopped".
INTERRUPTED = {
    "convert": "interrupted; rerun the same command to resume (the shards written so far are kept)",
}
VERBOSE_ENV = "MINIMAX_M3_VERBOSE"

# Errors that are the user's input (a path, a file, a value, a missing optional package):
# their message is the whole story. Anything else is a bug of ours, and says so.
KNOWN_ERRORS = (ValueError, OSError, ImportError, MemoryError)


def describe(e: BaseException) -> str:
    """One line for an exception."""
    if isinstance(e, OSError) and e.strerror and e.filename:
        msg = f"{e.filename}: {e.strerror}"
    else:
        msg = str(e) or type(e).__name__
    msg = " ".join(msg.split())
    if not isinstance(e, KNOWN_ERRORS):
        msg = f"{type(e).__name__}: {msg} (unexpected; rerun with --verbose for the traceback)"
    return msg


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv or os.environ.get(VERBOSE_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != "--verbose"]
    available = {k: v for k, v in COMMANDS.items() if importlib.util.find_spec(v[0]) is not None}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in available:
        print("usage: minimax-m3 <command> [options] [--verbose]\n\ncommands:")
        for name, (_, help_) in available.items():
            print(f"  {name:<10} {help_}")
        print(f"\n--verbose (or {VERBOSE_ENV}=1) shows the traceback of an error")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"minimax-m3: error: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    prog = f"minimax-m3 {argv[0]}"
    try:
        module = importlib.import_module(available[argv[0]][0])
        return module.main(argv[1:]) or 0
    except KeyboardInterrupt:
        if verbose:
            traceback.print_exc()
        print(f"\n{prog}: {INTERRUPTED.get(argv[0], 'interrupted')}", file=sys.stderr)
        return 130
    except Exception as e:  # SystemExit (argparse, --help) passes through
        if verbose:
            traceback.print_exc()
        print(f"{prog}: error: {describe(e)}", file=sys.stderr)
        return 1


# -- argparse value types: a value out of range is refused as argparse refuses a non-number --
def number(kind=int, lo=None, hi=None, lo_open=False, hi_open=False, also=()):
    """An argparse `type` accepting a finite `kind` in [lo, hi] (open ends where asked), or a value in `also`."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if value in also:
            return value
        if not math.isfinite(value) or (lo is not None and (value <= lo if lo_open else value < lo)) \
                or (hi is not None and (value >= hi if hi_open else value > hi)):
            left = "(" if lo_open else "["
            right = ")" if hi_open else "]"
            span = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
            extra = f" or {', '.join(map(str, also))}" if also else ""
            raise argparse.ArgumentTypeError(f"must be in {span}{extra}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


positive_int = number(int, lo=1)
non_negative_int = number(int, lo=0)
non_negative_float = number(float, lo=0)
positive_float = number(float, lo=0, lo_open=True)
probability = number(float, lo=0, hi=1)
seed = number(int, lo=0, hi=2**64 - 1)  # mx.random.seed takes a uint64
port = number(int, lo=0, hi=65535)


if __name__ == "__main__":
    sys.exit(main())
