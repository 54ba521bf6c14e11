"""User mistakes as one line on stderr, for every script and subcommand; tracebacks only for bugs.

A mistake the user can fix (a missing path, a bad value, nothing to resume) is raised as a :class:`UserError`
(exit status 1: the run failed) or :class:`UsageError` (exit status 2: the command line is wrong), or as one of
the error types a program hands to :func:`one_line_errors`. The program then ends with
``PROG: error: MESSAGE`` on stderr and that status. ``--debug`` on the command line or ``SINKHORN_HF_DEBUG=1``
lets the exception through with its full traceback. Argument parsers built on :class:`ShortUsageMixin` print a
one-line usage hint instead of every flag before argparse's own error line.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

DEBUG_FLAG = "--debug"
DEBUG_ENV = "SINKHORN_HF_DEBUG"
USAGE_STATUS = 2  # argparse's status for a wrong command line
FAILED_STATUS = 1


class UserError(Exception):
    """A mistake the user can fix, found while running: one line, exit status 1."""

    exit_status = FAILED_STATUS


class UsageError(UserError, ValueError):
    """A wrong command line (a missing path, a bad value), found before any heavy work: exit status 2."""

    exit_status = USAGE_STATUS


class ErrorExit(SystemExit):
    """The ``SystemExit`` that ends a program after its error line: ``code`` is the exit status, ``str()`` the
    line (what a caller running the program in-process can match)."""

    def __init__(self, line: str, status: int) -> None:
        super().__init__(status)
        self.line = line

    def __str__(self) -> str:
        return self.line


def debug_requested(argv: Sequence[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug``, and whether a full traceback was asked for (the flag or SINKHORN_HF_DEBUG)."""
    rest = [arg for arg in argv if arg != DEBUG_FLAG]
    env = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    return rest, env or len(rest) != len(argv)


def error_line(prog: str, error: BaseException | str) -> str:
    """``PROG: error: MESSAGE`` with the message's lines joined: one line whatever the exception holds."""
    message = " ".join(str(error).split("\n")).strip() or type(error).__name__
    return f"{prog}: error: {message}"


@contextmanager
def one_line_errors(
    prog: str, debug: bool = False, also: tuple[type[BaseException], ...] = (), quiet: bool = False
) -> Iterator[None]:
    """Turn a :class:`UserError` (or an exception of a type in ``also``: exit status 1) raised in the block into
    its error line on stderr and an :class:`ErrorExit`. ``debug`` re-raises it untouched; ``quiet`` (processes
    other than the main one of a distributed run) exits without printing, so the line appears once."""
    try:
        yield
    except (UserError, *also) as error:
        if debug:
            raise
        line = error_line(prog, error)
        if not quiet:
            print(line, file=sys.stderr, flush=True)
        raise ErrorExit(line, getattr(error, "exit_status", FAILED_STATUS)) from None


def is_main_process() -> bool:
    """False in the non-zero ranks of a launched run (``RANK``, set by torchrun and ``accelerate launch``)."""
    return os.environ.get("RANK", "0") in ("", "0")


def check_local_path(value: str | None, flag: str, *, kind: str = "path") -> None:
    """Refuse (:class:`UsageError`) a ``flag`` value that names a local path that does not exist: an absolute or
    ``./``/``../``/``~`` path, or one with more than one ``/`` (a Hub id has at most one). Other names may be Hub
    ids and are left to the Hub."""
    if value is None or Path(value).expanduser().exists():
        return
    if value.startswith((".", "~", os.sep)) or value.count("/") > 1:
        raise UsageError(f"{flag} {value}: this {kind} does not exist (a Hub id looks like 'user/name')")


def check_checkpoint_dir(value: str | None, flag: str) -> None:
    """Refuse a ``flag`` value that is a missing local folder (:func:`check_local_path`), or an existing one
    without the ``config.json`` every transformers checkpoint has."""
    check_local_path(value, flag, kind="folder")
    if value is None:
        return
    path = Path(value).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        held = sorted(p.name for p in path.iterdir())
        what = f"it holds {', '.join(held[:5])}{', ...' if len(held) > 5 else ''}" if held else "it is empty"
        raise UsageError(f"{flag} {value} is not a transformers checkpoint: it has no config.json ({what})")


class ShortUsageMixin:
    """For an ``argparse.ArgumentParser`` subclass: a command-line error prints one usage line pointing to
    ``--help`` and argparse's error line, not the usage of every flag; exit status 2."""

    def error(self: argparse.ArgumentParser, message: str) -> NoReturn:
        print(f"usage: {self.prog} ... (all options: {self.prog} --help)", file=sys.stderr)
        line = error_line(self.prog, message)
        print(line, file=sys.stderr, flush=True)
        raise ErrorExit(line, USAGE_STATUS)


class ShortUsageParser(ShortUsageMixin, argparse.ArgumentParser):
    """An ``argparse.ArgumentParser`` with :class:`ShortUsageMixin`'s errors (its subparsers inherit them)."""
