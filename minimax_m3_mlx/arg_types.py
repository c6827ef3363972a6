"""argparse value types: a value out of range is refused as argparse refuses a non-number.

At the bottom of the layers so that every command's parser (convert, serving, cli) can use them.
"""

from __future__ import annotations

import argparse
import json
import math

from mlx_lm.utils import _parse_size


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with its refusal on one line, `PROG: error: MESSAGE` (the message
    names the flag); the usage that argparse prints first is left to --help."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


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


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text}")
    return value


def size(text: str) -> int:
    try:
        value = _parse_size(text)
    except Exception:  # decimal.InvalidOperation, ValueError, KeyError
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 512MB, 8GB)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value
