"""IMDB sentiment fine-tuning: ``stanfordnlp/imdb`` from the Hub or local csv(.gz)/json(l) with text,label.

Long reviews are truncated to ``--max_length`` tokens, or split into overlapping chunks that all train
with the review's label; at evaluation a review's logits are the mean over its chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import datasets

from .arguments import ModelArguments, TrainerArguments
from .files import load_table
from .metrics import EvalOutput, classification_metrics
from .text import check_columns, encode_labels, subsample
from .trainer import EXAMPLE_ID

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


def load_imdb(data_args: ImdbDataArguments) -> dict[str, datasets.Dataset]:
    """``train`` and ``test`` with columns text and labels (0 = negative, 1 = positive)."""
    if data_args.train_file is None:
        hub = datasets.load_dataset(data_args.dataset_name)
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


def run_imdb(
    model_args: ModelArguments, data_args: ImdbDataArguments, trainer_args: TrainerArguments
) -> dict[str, Any]:
    """Fine-tune on IMDB; writes the model and results.json into ``--output_dir``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    from .modeling import build_model, load_config
    from .results import run_header
    from .trainer import Trainer, make_accelerator

    accelerator = make_accelerator(trainer_args)
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
    with accelerator.main_process_first():
        splits = load_imdb(data_args)
        train = tokenize(
            subsample(splits["train"], data_args.max_train_samples, trainer_args.seed), tokenizer, data_args
        )
        test = tokenize(subsample(splits["test"], data_args.max_eval_samples, trainer_args.seed), tokenizer, data_args)
    labels = dict(enumerate(LABEL_NAMES))
    config = load_config(model_args, num_labels=2, id2label=labels, label2id={v: k for k, v in labels.items()})
    model, lora_targets = build_model(model_args, config, AutoModelForSequenceClassification)
    header = run_header(
        model_args,
        trainer_args,
        task_name="imdb",
        dataset=[data_args.train_file, data_args.validation_file] if data_args.train_file else data_args.dataset_name,
        eval_split="test",
    )
    header.update(long_text_strategy=data_args.long_text_strategy, max_length=data_args.max_length)
    if header["lora"] is not None:
        header["lora"]["target_modules"] = list(lora_targets)
    trainer = Trainer(
        model,
        trainer_args,
        train_dataset=train,
        eval_datasets={"": test},
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_imdb_metrics,
        accelerator=accelerator,
        processing_class=tokenizer,
        run_info=header,
        main_metric="accuracy",
    )
    return trainer.train()
