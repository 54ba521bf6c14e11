"""Read local data files (csv, tsv, json/jsonl, optionally gzipped) into a ``datasets.Dataset``.

TSVs are read with no quoting (GLUE sentences contain bare ``"``); csv/tsv cells stay strings, so a text
column never turns numeric and "NA" stays "NA". Callers convert their label columns. An empty file, or a table
with a header and no rows, is refused naming the file. Hub datasets that cannot be reached point to the local-file
flags (:func:`load_hub_dataset`).
"""

from __future__ import annotations

import csv
import gzip
from collections.abc import Sequence
from pathlib import Path

import datasets
import pandas as pd

TABLE_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl")


def table_format(path: str | Path) -> str:
    """``csv``, ``tsv`` or ``json`` from the file name (a trailing ``.gz`` is allowed)."""
    name = Path(path).name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for suffix in TABLE_SUFFIXES:
        if name.endswith(suffix):
            return "json" if suffix == ".jsonl" else suffix[1:]
    raise ValueError(f"{path}: unsupported data file; expected one of {', '.join(TABLE_SUFFIXES)} (optionally .gz)")


def read_header(path: str | Path, sep: str) -> list[str]:
    quoting = csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL
    try:
        return list(pd.read_csv(path, sep=sep, quoting=quoting, nrows=0).columns)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path} is empty: expected a header line naming the columns, then the rows") from None


def _check_rows(path: Path, fmt: str, sep: str, header: int | None) -> None:
    """Refuse a file without a single example (empty, or only a header line)."""
    if fmt == "json":
        with (gzip.open if path.name.lower().endswith(".gz") else open)(path, "rt") as file:
            if not any(line.strip() for line in file):
                raise ValueError(f"{path} is empty: expected one JSON object per line (or a JSON list of rows)")
        return
    quoting = csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL
    try:
        first = pd.read_csv(path, sep=sep, quoting=quoting, header=header, nrows=1, dtype=str)
    except pd.errors.EmptyDataError:
        first = None
    if first is None or len(first) == 0:
        what = f"a header ({', '.join(first.columns)}) but no rows" if first is not None else "no rows"
        raise ValueError(f"{path} has {what}: expected at least one example")


def load_hub_dataset(name: str, config: str | None = None, *, local_flags: str) -> datasets.DatasetDict:
    """``datasets.load_dataset(name, config)``; when the Hub cannot be reached (offline, no connection), an error
    naming ``local_flags``, the way to train on local files instead."""
    try:
        return datasets.load_dataset(name, config)
    except ConnectionError as error:
        raise ConnectionError(
            f"cannot load the Hub dataset {name}{f' ({config})' if config else ''}: {error}. Offline, or without "
            f"access to the Hub, pass local files instead: {local_flags}"
        ) from error


def load_table(path: str | Path, column_names: Sequence[str] | None = None) -> datasets.Dataset:
    """The rows of ``path``. ``column_names`` reads a csv/tsv without a header line under these names."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    fmt = table_format(path)
    if fmt == "json":
        if column_names is not None:
            raise ValueError(f"{path}: json rows carry their own column names")
        _check_rows(path, fmt, "", None)
        return datasets.load_dataset("json", data_files=str(path), split="train")
    sep = "\t" if fmt == "tsv" else ","
    if column_names is None:
        names, header = read_header(path, sep), 0
    else:
        names, header = list(column_names), None
    _check_rows(path, fmt, sep, header)
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
