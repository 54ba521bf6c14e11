"""``sinkhorn-hf``: one console script, one module per subcommand under :mod:`sinkhorn_hf.commands`.

A user mistake ends as one line, ``sinkhorn-hf COMMAND: error: ...`` (:mod:`sinkhorn_hf.user_errors`); ``--debug``
(anywhere on the command line) or ``SINKHORN_HF_DEBUG=1`` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .commands import CommandParser
from .user_errors import ShortUsageParser, debug_requested, one_line_errors

# Each module defines ``add_parser(subparsers)`` that registers its subcommand and sets ``func``.
_COMMANDS = (
    "sinkhorn_hf.commands.demo",
    "sinkhorn_hf.commands.diagnose",
    "sinkhorn_hf.commands.convert",
    "sinkhorn_hf.commands.card",
    "sinkhorn_hf.commands.push",
    "sinkhorn_hf.commands.export",
)


def build_parser() -> argparse.ArgumentParser:
    parser = ShortUsageParser(
        prog="sinkhorn-hf",
        description="Sinkformers (doubly stochastic attention) for Hugging Face transformers.",
        epilog="A mistake is reported in one line; add --debug (or set SINKHORN_HF_DEBUG=1) for the full traceback.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=CommandParser)
    for name in _COMMANDS:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv, debug = debug_requested(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    with one_line_errors(f"sinkhorn-hf {args.command}", debug=debug):
        return args.func(args) or 0


if __name__ == "__main__":
    raise SystemExit(main())
