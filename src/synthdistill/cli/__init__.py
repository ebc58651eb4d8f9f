"""The ``synthdistill`` command: argument parsing only; each subcommand calls one public function.

Each subcommand lives in its own module here with a ``register(subparsers)`` function; heavy
libraries are imported inside the command functions, so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from synthdistill import __version__
from synthdistill.errors import SynthdistillError

COMMANDS = (  # in pipeline order, as `synthdistill --help` lists them
    "datasets",
    "config",
    "prompts",
    "generate",
    "distill",
    "evaluate",
    "export",
    "predict",
    "run",
    "report",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="synthdistill",
        description="Distil CLIP's image encoder into a small zero-shot student from synthetic images.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="Show debug logging.")
    parser.add_argument("--version", action="version", version=f"synthdistill {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"synthdistill.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.func(args) or 0
    except SynthdistillError as e:
        from synthdistill.cli.common import cli_style

        print(f"error: {e.render(cli_style(getattr(args, 'recipe_flags', {})))}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume.", file=sys.stderr)
        sys.exit(130)
