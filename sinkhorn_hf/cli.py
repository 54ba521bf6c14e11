"""``sinkhorn-hf``: one console script, one module per subcommand under :mod:`sinkhorn_hf.commands`."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

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
    parser = argparse.ArgumentParser(
        prog="sinkhorn-hf",
        description="Sinkformers (doubly stochastic attention) for Hugging Face transformers.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMANDS:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    raise SystemExit(main())
