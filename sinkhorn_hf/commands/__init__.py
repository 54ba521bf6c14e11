"""Subcommands of the ``sinkhorn-hf`` console script (see :mod:`sinkhorn_hf.cli`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NoReturn


def add_command(
    subparsers: argparse._SubParsersAction,
    name: str,
    run: Callable[[argparse.Namespace], int],
    *,
    help: str,
    description: str,
) -> argparse.ArgumentParser:
    """Register subcommand ``name`` whose parsed arguments go to ``run``; returns its parser for the flags."""
    parser = subparsers.add_parser(name, help=help, description=description)
    parser.set_defaults(func=run)
    return parser


def fail(command: str, error: object) -> NoReturn:
    """Leave with ``sinkhorn-hf COMMAND: error: ...`` (exit status 1), as argparse words its own errors."""
    raise SystemExit(f"sinkhorn-hf {command}: error: {error}") from None
