"""Tiny random MiniMax-M3 checkpoints in every released layout (tests and the demo)."""

from .checkpoints import *  # noqa: F401,F403
