"""Shared steps of the text pipelines: label conversion, subsampling, tokenizer and collator."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import datasets

from .arguments import ModelArguments


def check_columns(dataset: datasets.Dataset, needed: Sequence[str], where: str, hint: str) -> None:
    missing = [c for c in needed if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{where} lacks column(s) {', '.join(repr(c) for c in missing)} "
            f"(it has: {', '.join(dataset.column_names)}). {hint}"
        )


def encode_labels(
    dataset: datasets.Dataset, label_names: Sequence[str] | None, where: str, column: str = "label"
) -> datasets.Dataset:
    """Labels as class ids (given as ids or as names in ``label_names``), or finite floats for regression (None)."""

    def convert(row: int, value: str | int | float) -> int | float:
        if label_names is None:
            try:
                number = float(value)
            except ValueError as err:
                raise ValueError(f"{where}: regression label {value!r} is not a number") from err
            if not math.isfinite(number):
                raise ValueError(
                    f"{where}: row {row + 1} (counting data rows from 1) has the regression label {value!r}; "
                    "labels must be finite numbers"
                )
            return number
        if isinstance(value, str) and value in label_names:
            return label_names.index(value)
        try:
            index = int(value)
        except ValueError:
            index = -1
        if not 0 <= index < len(label_names):
            allowed = ", ".join(f"{i} or {name!r}" for i, name in enumerate(label_names))
            raise ValueError(f"{where}: label {value!r} is not one of: {allowed}")
        return index

    values = dataset[column]
    converted = [convert(row, v) for row, v in enumerate(values)]
    feature = datasets.Value("float32") if label_names is None else datasets.ClassLabel(names=list(label_names))
    return dataset.remove_columns(column).add_column("labels", converted, feature=feature)


def subsample(dataset: datasets.Dataset, n: int | None, seed: int) -> datasets.Dataset:
    """A seeded random subset of ``n`` rows (random, not the first n: some files are sorted by label)."""
    if n is None or n >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(n)).flatten_indices()


def load_tokenizer(model_args: ModelArguments) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)


def text_collator(tokenizer: Any, config: Any) -> Any:
    """Pads token ids (and attention masks) to the longest row of each batch."""
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer)
