"""IMDB sentiment fine-tuning: ``stanfordnlp/imdb`` from the Hub or local csv(.gz)/json(l) with text,label.

Long reviews are truncated to ``--max_length`` tokens, or split into overlapping chunks that all train
with the review's label; at evaluation a review's logits are the mean over its chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import datasets

from ..arguments import ModelArguments, require_at_least_one
from ..files import load_hub_dataset, load_table
from ..metrics import EvalOutput, classification_metrics
from ..run import Task, TaskData
from ..text import check_columns, cuts, encode_labels, load_tokenizer, subsample, text_collator
from ..trainer import EXAMPLE_ID

HUB_DATASET = "stanfordnlp/imdb"
LABEL_NAMES = ("neg", "pos")


@dataclass
class ImdbDataArguments:
    dataset_name: str = field(default=HUB_DATASET, metadata={"help": "Hub dataset with train/test splits"})
    train_file: str | None = field(default=None, metadata={"help": "local csv(.gz) or json(l) with text,label"})
    validation_file: str | None = field(default=None, metadata={"help": "local evaluation file (e.g. test.csv.gz)"})
    max_length: int = field(default=512, metadata={"help": "tokens per example (per chunk with chunking)"})
    long_text_strategy: Literal["truncate", "chunk"] = field(
        default="truncate", metadata={"help": "truncate long reviews, or split them into chunks"}
    )
    doc_stride: int = field(default=64, metadata={"help": "tokens shared by consecutive chunks"})
    max_train_samples: int | None = field(default=None, metadata={"help": "train on a seeded random subset"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "evaluate on a seeded random subset"})

    def __post_init__(self) -> None:
        if (self.train_file is None) != (self.validation_file is None):
            raise ValueError("give both --train_file and --validation_file (or neither, to load --dataset_name)")
        if self.max_length < 8:
            raise ValueError(f"--max_length must be >= 8, got {self.max_length}")
        if not 0 <= self.doc_stride < self.max_length // 2:
            raise ValueError(f"--doc_stride must be in [0, max_length/2), got {self.doc_stride}")
        require_at_least_one(max_train_samples=self.max_train_samples, max_eval_samples=self.max_eval_samples)


def load_imdb(data_args: ImdbDataArguments) -> dict[str, datasets.Dataset]:
    """``train`` and ``test`` with columns text and labels (0 = negative, 1 = positive)."""
    if data_args.train_file is None:
        hub = load_hub_dataset(data_args.dataset_name, local_flags="--train_file and --validation_file")
        return {
            split: hub[split].select_columns(["text", "label"]).rename_column("label", "labels")
            for split in ("train", "test")
        }
    splits = {}
    for split, path in (("train", data_args.train_file), ("test", data_args.validation_file)):
        table = load_table(path)
        check_columns(table, ["text", "label"], path, "IMDB files have a text column and a label column (0/1).")
        splits[split] = encode_labels(table.select_columns(["text", "label"]), LABEL_NAMES, path)
    return splits


def tokenize(dataset: datasets.Dataset, tokenizer: Any, data_args: ImdbDataArguments) -> datasets.Dataset:
    """Token ids per review (truncate) or per chunk, with ``example_id`` naming the review (chunk)."""
    chunk = data_args.long_text_strategy == "chunk"

    def encode(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        encoded = tokenizer(
            batch["text"],
            truncation=True,
            max_length=data_args.max_length,
            return_overflowing_tokens=chunk,
            stride=data_args.doc_stride if chunk else 0,
        )
        rows = encoded.pop("overflow_to_sample_mapping", range(len(indices)))
        encoded = dict(encoded)
        encoded["labels"] = [batch["labels"][i] for i in rows]
        if chunk:
            encoded[EXAMPLE_ID] = [indices[i] for i in rows]
        return encoded

    return dataset.map(encode, batched=True, with_indices=True, remove_columns=dataset.column_names, desc="tokenize")


def compute_imdb_metrics(output: EvalOutput) -> dict[str, float]:
    return classification_metrics(output, with_f1=True)


def load_task_data(data_args: ImdbDataArguments, model_args: ModelArguments, seed: int) -> TaskData:
    """Tokenized (chunked) train and test splits; the test split evaluates."""
    tokenizer = load_tokenizer(model_args)
    splits = load_imdb(data_args)
    train, test = (
        tokenize(subsample(splits[split], limit, seed), tokenizer, data_args)
        for split, limit in (("train", data_args.max_train_samples), ("test", data_args.max_eval_samples))
    )
    return TaskData(
        task_name="imdb",
        dataset=[data_args.train_file, data_args.validation_file] if data_args.train_file else data_args.dataset_name,
        eval_split="test",
        train=train,
        evals={"": test},
        label_names=LABEL_NAMES,
        compute_metrics=compute_imdb_metrics,
        main_metric="accuracy",
        processor=tokenizer,
        info={
            "long_text_strategy": data_args.long_text_strategy,
            "max_length": data_args.max_length,
            "eval_subset": cuts(splits["test"], data_args.max_eval_samples),
        },
    )


IMDB = Task(ImdbDataArguments, "AutoModelForSequenceClassification", load_task_data, text_collator)
