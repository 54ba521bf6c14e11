"""Read local data files (csv, tsv, json/jsonl, optionally gzipped) into a ``datasets.Dataset``.

TSVs are read with no quoting (GLUE sentences contain bare ``"``); csv/tsv cells stay strings, so a text
column never turns numeric and "NA" stays "NA". Callers convert their label columns. A bad file is refused with a
:class:`DataError` naming the file, and the line where it can: empty, a header and no rows, a row with a missing or
an extra field (a tab inside a TSV text), a JSON line that is not an object; :func:`row_location` names the line of
a row for the callers' own checks (a bad label). Hub datasets that cannot be reached point to the local-file flags
(:func:`load_hub_dataset`).
"""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

import datasets
import pandas as pd

from ..user_errors import UserError

TABLE_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl")


class DataError(UserError, ValueError):
    """A data file that cannot be read as the task needs it; the message names the file (and the line)."""


class HubDatasetUnreachableError(UserError, ConnectionError):
    """A Hub dataset that cannot be loaded (offline, no access); the message names the local-file flags."""


def _open_text(path: Path) -> IO[str]:
    return gzip.open(path, "rt", newline="") if path.name.lower().endswith(".gz") else open(path, newline="")


def _records(path: Path, fmt: str) -> Iterator[tuple[int, list[str]]]:
    """(first line, fields) of every csv/tsv record, with the quoting the reader uses (none for TSV)."""
    sep, quoting = ("\t", csv.QUOTE_NONE) if fmt == "tsv" else (",", csv.QUOTE_MINIMAL)
    with _open_text(path) as file:
        reader, line = csv.reader(file, delimiter=sep, quoting=quoting), 1
        for fields in reader:
            yield line, fields
            line = reader.line_num + 1


def _check_fields(path: Path, fmt: str, names: Sequence[str], header: bool) -> None:
    """Every csv/tsv row has one field per column (a blank line is skipped, as the reader does)."""
    for line, fields in _records(path, fmt):
        if (header and line == 1) or fields in ([], [""]) or len(fields) == len(names):
            continue
        if len(fields) < len(names):
            why = "a field is missing"
        else:  # TSV has no quoting, so a tab inside a sentence makes two fields of it
            why = "an extra field" + (" (a tab inside a text?)" if fmt == "tsv" else "")
        raise DataError(f"{path}, line {line}: {why}: {len(fields)} fields, expected {len(names)} ({', '.join(names)})")


def _check_json_lines(path: Path) -> None:
    """In a JSON-lines file (first character ``{``) every non-blank line is one JSON object."""
    with _open_text(path) as file:
        for line, text in enumerate(file, start=1):
            if line == 1 and not text.lstrip().startswith("{"):
                return  # a JSON list of rows: datasets reads it whole
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{path}, line {line}: not valid JSON ({error.msg}); expected one object per line"
                ) from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {line}: a JSON {type(row).__name__}; expected one object per line")


def row_location(path: str | Path, row: int, header: bool = True) -> str:
    """``PATH, line L`` of data row ``row`` (0-based) of a table :func:`load_table` read (``header``: whether the
    csv/tsv has a header line); ``PATH, row N`` (1-based) where lines do not say (a JSON list)."""
    path = Path(path)
    if table_format(path) != "json":
        starts = (line for line, fields in _records(path, table_format(path)) if fields not in ([], [""]))
    else:
        with _open_text(path) as file:
            lines = list(file)
        json_lines = bool(lines) and lines[0].lstrip().startswith("{")
        starts = (number for number, text in enumerate(lines, start=1) if json_lines and text.strip())
        header = False
    for index, line in enumerate(starts):
        if index == row + header:
            return f"{path}, line {line}"
    return f"{path}, row {row + 1}"


def table_format(path: str | Path) -> str:
    """``csv``, ``tsv`` or ``json`` from the file name (a trailing ``.gz`` is allowed)."""
    name = Path(path).name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for suffix in TABLE_SUFFIXES:
        if name.endswith(suffix):
            return "json" if suffix == ".jsonl" else suffix[1:]
    raise DataError(f"{path}: unsupported data file; expected one of {', '.join(TABLE_SUFFIXES)} (optionally .gz)")


def read_header(path: str | Path, sep: str) -> list[str]:
    quoting = csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL
    try:
        return list(pd.read_csv(path, sep=sep, quoting=quoting, nrows=0).columns)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty: expected a header line naming the columns, then the rows") from None


def _check_rows(path: Path, fmt: str, sep: str, header: int | None) -> None:
    """Refuse a file without a single example (empty, or only a header line)."""
    if fmt == "json":
        with (gzip.open if path.name.lower().endswith(".gz") else open)(path, "rt") as file:
            if not any(line.strip() for line in file):
                raise DataError(f"{path} is empty: expected one JSON object per line (or a JSON list of rows)")
        return
    quoting = csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL
    try:
        first = pd.read_csv(path, sep=sep, quoting=quoting, header=header, nrows=1, dtype=str)
    except pd.errors.EmptyDataError:
        first = None
    if first is None or len(first) == 0:
        what = f"a header ({', '.join(first.columns)}) but no rows" if first is not None else "no rows"
        raise DataError(f"{path} has {what}: expected at least one example")


def load_hub_dataset(name: str, config: str | None = None, *, local_flags: str) -> datasets.DatasetDict:
    """``datasets.load_dataset(name, config)``; when the Hub cannot be reached (offline, no connection), an error
    naming ``local_flags``, the way to train on local files instead."""
    try:
        return datasets.load_dataset(name, config)
    except ConnectionError as error:
        raise HubDatasetUnreachableError(
            f"cannot load the Hub dataset {name}{f' ({config})' if config else ''}: {error}. Offline, or without "
            f"access to the Hub, pass local files instead: {local_flags}"
        ) from error


def load_table(path: str | Path, column_names: Sequence[str] | None = None) -> datasets.Dataset:
    """The rows of ``path``. ``column_names`` reads a csv/tsv without a header line under these names."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    fmt = table_format(path)
    if fmt == "json":
        if column_names is not None:
            raise DataError(f"{path}: json rows carry their own column names")
        _check_rows(path, fmt, "", None)
        _check_json_lines(path)
        return datasets.load_dataset("json", data_files=str(path), split="train")
    sep = "\t" if fmt == "tsv" else ","
    if column_names is None:
        names, header = read_header(path, sep), 0
    else:
        names, header = list(column_names), None
    _check_rows(path, fmt, sep, header)
    _check_fields(path, fmt, names, header == 0)
    return datasets.load_dataset(
        "csv",
        data_files=str(path),
        split="train",
        sep=sep,
        quoting=csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL,
        header=header,
        column_names=names,
        keep_default_na=False,
        features=datasets.Features({name: datasets.Value("string") for name in names}),
    )
