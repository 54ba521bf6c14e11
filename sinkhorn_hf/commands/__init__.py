"""Subcommands of the ``sinkhorn-hf`` console script (see :mod:`sinkhorn_hf.cli`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, NoReturn

from ..user_errors import ShortUsageParser, UsageError, UserError


class CommandParser(ShortUsageParser):
    """A subcommand's parser: every ``--long-option`` is also accepted as ``--long_option`` (and the other way
    round), as the fine-tuning scripts spell their flags; errors as :class:`ShortUsageParser`."""

    def add_argument(self, *names: str, **kwargs: Any) -> argparse.Action:
        other = [_other_spelling(name) for name in names if name.startswith("--")]
        return super().add_argument(*names, *(name for name in other if name not in names), **kwargs)


def _other_spelling(option: str) -> str:
    body = option[2:]
    return "--" + (body.replace("-", "_") if "-" in body else body.replace("_", "-"))


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


def fail(error: object, usage: bool = False) -> NoReturn:
    """Leave with ``sinkhorn-hf COMMAND: error: ...``, exit status 1 (2 with ``usage``: a bad flag value): a
    :class:`UserError` for the console script's one-line handler, chained to ``error`` for ``--debug``."""
    raise (UsageError if usage else UserError)(str(error)) from (error if isinstance(error, BaseException) else None)
