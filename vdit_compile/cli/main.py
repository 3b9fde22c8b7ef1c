"""``vdit-compile`` entry point.

Each command lives in ``vdit_compile/cli/cmd_<name>.py`` and exposes
``register(subparsers) -> argparse.ArgumentParser`` (the parser's ``func`` default runs it, returning
an exit code).  Commands are imported lazily so ``vdit-compile --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

#: command name -> module under vdit_compile.cli
COMMANDS = {
    "demo": "cmd_demo",
    "inspect": "cmd_inspect",
    "calibrate": "cmd_calibrate",
    "plan": "cmd_plan",
    "score": "cmd_score",
    "export": "cmd_export",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vdit-compile", description="Make video diffusion transformers fast.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        importlib.import_module(f"vdit_compile.cli.{module}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
