"""Shared steps of the text pipelines: label conversion, subsampling, tokenizer and collator."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import datasets

from .arguments import ModelArguments
from .files import DataError, row_location


def check_columns(dataset: datasets.Dataset, needed: Sequence[str], where: str, hint: str) -> None:
    missing = [c for c in needed if c not in dataset.column_names]
    if missing:
        raise DataError(
            f"{where} lacks column(s) {', '.join(repr(c) for c in missing)} "
            f"(it has: {', '.join(dataset.column_names)}). {hint}"
        )


def encode_labels(
    dataset: datasets.Dataset,
    label_names: Sequence[str] | None,
    path: str,
    column: str = "label",
    header: bool = True,
) -> datasets.Dataset:
    """Labels as class ids (given as ids or as names in ``label_names``), or finite floats for regression (None).
    ``dataset`` holds the rows of the local file ``path`` in file order (``header``: it has a header line); a bad
    label raises :class:`~.files.DataError` naming the file and the line."""

    def convert(row: int, value: str | int | float | None) -> int | float:
        if label_names is None:
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = None
            if number is None or not math.isfinite(number):
                raise DataError(f"{row_location(path, row, header)}: regression label {value!r} is not a finite number")
            return number
        if isinstance(value, str) and value in label_names:
            return label_names.index(value)
        try:
            index = int(value)
        except (TypeError, ValueError):
            index = -1
        if not 0 <= index < len(label_names):
            allowed = ", ".join(f"{i} or {name!r}" for i, name in enumerate(label_names))
            raise DataError(f"{row_location(path, row, header)}: label {value!r} is not one of: {allowed}")
        return index

    values = dataset[column]
    converted = [convert(row, v) for row, v in enumerate(values)]
    feature = datasets.Value("float32") if label_names is None else datasets.ClassLabel(names=list(label_names))
    return dataset.remove_columns(column).add_column("labels", converted, feature=feature)


def cuts(dataset: datasets.Dataset, n: int | None) -> bool:
    """Whether :func:`subsample` with ``n`` keeps only part of ``dataset``."""
    return n is not None and n < len(dataset)


def subsample(dataset: datasets.Dataset, n: int | None, seed: int) -> datasets.Dataset:
    """A seeded random subset of ``n`` rows (random, not the first n: some files are sorted by label)."""
    if not cuts(dataset, n):
        return dataset
    return dataset.shuffle(seed=seed).select(range(n)).flatten_indices()


def load_tokenizer(model_args: ModelArguments) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)


def text_collator(tokenizer: Any, config: Any) -> Any:
    """Pads token ids (and attention masks) to the longest row of each batch."""
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer)
