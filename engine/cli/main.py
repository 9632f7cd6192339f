"""`layerfold` command line: thin argparse subcommands that call typed library functions.

Each command is one module ``layerfold.cli.<name>`` (``engine/cli/<name>.py``) exposing
``register(subparsers)``, plus its name in ``COMMANDS``; the parser adds a subcommand whose
``func(args) -> int`` does the work. Errors in user input print one line naming the
cause and the fix, and exit with status 2.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

COMMANDS = ("convert", "inspect", "eval", "lm_eval", "generate", "calibrate", "prune", "heal", "export", "bench",
            "serve", "demo")

_SPACE = "free space on that disk, or write to another one"
_ACCESS = "check the permissions of that path, or use one you can read and write"
OS_FIXES = {errno.ENOSPC: _SPACE, errno.EDQUOT: _SPACE, errno.EACCES: _ACCESS, errno.EPERM: _ACCESS,
            errno.EROFS: _ACCESS}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="layerfold",
        description="Depth and width surgery for Llama-family LLMs: calibrate, prune, heal, evaluate, serve, bench.",
    )
    from layerfold import __version__

    p.add_argument("--version", action="version", version=f"layerfold {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"layerfold.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"layerfold.cli.{name}":
                continue
            raise
        mod.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, TypeError) as e:
        if os.environ.get("LAYERFOLD_DEBUG"):
            raise
        print(f"layerfold {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and closed early
        sys.stderr.close()
        return 0
    except OSError as e:  # a full disk or a path it may not write, met while writing (nothing half-written is kept)
        fix = OS_FIXES.get(e.errno or 0)
        if fix is None or os.environ.get("LAYERFOLD_DEBUG"):
            raise
        print(f"layerfold {args.command}: error: {e}. Fix: {fix}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"layerfold {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
