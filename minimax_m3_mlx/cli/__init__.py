"""`minimax-m3 <command>`: one entry point, one module per command."""

from __future__ import annotations

import importlib
import sys

# command -> (module, help). Each module has `main(argv: list[str] | None) -> int | None`.
COMMANDS = {
    "demo": ("minimax_m3_mlx.cli.demo", "write a tiny MXFP8 checkpoint, load it and generate (no network)"),
    "convert": ("minimax_m3_mlx.convert.cli", "convert a released checkpoint to an MLX model"),
    "generate": ("minimax_m3_mlx.serving.generate", "generate text from a prompt"),
    "chat": ("minimax_m3_mlx.serving.chat", "chat at the terminal"),
    "server": ("minimax_m3_mlx.serving.server", "OpenAI-compatible server (mlx-lm's)"),
    "plan": ("minimax_m3_mlx.cli.plan", "memory plan for one or more Macs"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    available = {k: v for k, v in COMMANDS.items() if importlib.util.find_spec(v[0]) is not None}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in available:
        print("usage: minimax-m3 <command> [options]\n\ncommands:")
        for name, (_, help_) in available.items():
            print(f"  {name:<10} {help_}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    module = importlib.import_module(available[argv[0]][0])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
