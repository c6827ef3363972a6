"""`minimax-m3 <command>`: one entry point, one module per command.

Every command's errors end here: a mistake prints one line, `minimax-m3 CMD: error: ...`,
and exits non-zero; `--verbose` (anywhere on the command line) or MINIMAX_M3_VERBOSE=1
adds the traceback and the package's debug log.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import traceback

from .. import __version__

# command -> (module, help). Each module has `main(argv: list[str] | None) -> int | None`.
COMMANDS = {
    "demo": ("minimax_m3_mlx.cli.demo", "write a tiny MXFP8 checkpoint, load it and generate (no network)"),
    "convert": ("minimax_m3_mlx.convert.cli", "convert a released checkpoint to an MLX model"),
    "generate": ("minimax_m3_mlx.serving.generate", "generate text from a prompt"),
    "chat": ("minimax_m3_mlx.serving.chat", "chat at the terminal"),
    "server": ("minimax_m3_mlx.serving.server", "OpenAI-compatible server (mlx-lm's)"),
    "plan": ("minimax_m3_mlx.cli.plan", "memory plan for one or more Macs"),
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
    if argv[:1] == ["--version"]:
        print(f"minimax-m3 {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in available:
        print("usage: minimax-m3 <command> [options] [--verbose]\n\ncommands:")
        for name, (_, help_) in available.items():
            print(f"  {name:<10} {help_}")
        print(f"\n--verbose (or {VERBOSE_ENV}=1) shows the traceback of an error and the debug log; --version prints the version")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"minimax-m3: error: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    prog = f"minimax-m3 {argv[0]}"
    with _debug_log(verbose):
        return _run(prog, available[argv[0]][0], argv, verbose)


@contextlib.contextmanager
def _debug_log(on: bool):
    """With --verbose, the package's debug log (e.g. which checkpoint layout a load found) on
    stderr for the command's run."""
    if not on:
        yield
        return
    logger = logging.getLogger("minimax_m3_mlx")
    level, handler = logger.level, logging.StreamHandler()
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _run(prog: str, module_name: str, argv, verbose: bool) -> int:
    try:
        module = importlib.import_module(module_name)
        return module.main(argv[1:]) or 0
    except KeyboardInterrupt:
        if verbose:
            traceback.print_exc()
        print(f"\n{prog}: {INTERRUPTED.get(argv[0], 'interrupted')}", file=sys.stderr)
        return 130
    except Exception as e:  # SystemExit (argparse, --help) passes through
        if verbose:
            traceback.print_exc()
        if not (getattr(e, "every_rank", False) and _rank() != 0):  # else rank 0 says it for every rank
            print(f"{prog}: error: {describe(e)}", file=sys.stderr)
        return 1


def _rank() -> int:
    """This process's rank under mlx.launch (0 alone)."""
    import mlx.core as mx

    return mx.distributed.init().rank()


if __name__ == "__main__":
    sys.exit(main())
