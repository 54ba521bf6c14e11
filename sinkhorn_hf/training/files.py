"""Read local data files (csv, tsv, json/jsonl, optionally gzipped) into a ``datasets.Dataset``.

TSVs are read with no quoting (GLUE sentences contain bare ``"``); csv/tsv cells stay strings, so a text
column never turns numeric and "NA" stays "NA". Callers convert their label columns.
"""

from __future__ import annotations

import csv
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
    return list(pd.read_csv(path, sep=sep, quoting=quoting, nrows=0).columns)


def load_table(path: str | Path, column_names: Sequence[str] | None = None) -> datasets.Dataset:
    """The rows of ``path``. ``column_names`` reads a csv/tsv without a header line under these names."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    fmt = table_format(path)
    if fmt == "json":
        if column_names is not None:
            raise ValueError(f"{path}: json rows carry their own column names")
        return datasets.load_dataset("json", data_files=str(path), split="train")
    sep = "\t" if fmt == "tsv" else ","
    if column_names is None:
        names, header = read_header(path, sep), 0
    else:
        names, header = list(column_names), None
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
