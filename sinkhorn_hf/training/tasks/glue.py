"""GLUE fine-tuning: the nine tasks of the Hub's ``nyu-mll/glue``, from the Hub or local files.

Local files may be csv, json(l) or the original GLUE TSV layout (auto-detected); columns are mapped to the
Hub's names (e.g. MRPC's ``#1 String`` -> ``sentence1``, MNLI's ``gold_label`` -> ``label``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from ..arguments import ModelArguments, require_at_least_one
from ..files import load_hub_dataset, load_table, read_header, table_format
from ..metrics import EvalOutput, MetricFn
from ..run import Task, TaskData
from ..text import check_columns, cuts, encode_labels, load_tokenizer, subsample, text_collator

HUB_DATASET = "nyu-mll/glue"
METRIC_MODULE = Path(__file__).with_name("glue_metric.py")


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task as the Hub's ``nyu-mll/glue`` lays it out.

    ``label_names`` in the Hub's id order (None: regression); ``tsv_columns`` maps the original GLUE TSV
    header names to the Hub's; ``headerless`` names the columns of a TSV without a header line; ``title`` is
    the benchmark's own spelling (SST-2); ``main_metric`` the one early stopping watches by default.
    """

    name: str
    text_columns: tuple[str, ...]
    label_names: tuple[str, ...] | None
    validation_splits: tuple[str, ...] = ("validation",)
    tsv_columns: dict[str, str] = field(default_factory=dict)
    headerless: tuple[str, ...] | None = None
    title: str = ""
    main_metric: str = "accuracy"

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)


_NLI = ("entailment", "not_entailment")
GLUE_TASKS: dict[str, GlueTask] = {
    task.name: task
    for task in (
        GlueTask(
            "cola",
            ("sentence",),
            ("unacceptable", "acceptable"),
            headerless=("sentence_source", "label", "label_notes", "sentence"),
            title="CoLA",
            main_metric="matthews_correlation",
        ),
        GlueTask("sst2", ("sentence",), ("negative", "positive"), title="SST-2"),
        GlueTask(
            "mrpc",
            ("sentence1", "sentence2"),
            ("not_equivalent", "equivalent"),
            tsv_columns={"#1 String": "sentence1", "#2 String": "sentence2", "Quality": "label"},
            title="MRPC",
        ),
        GlueTask(
            "qqp",
            ("question1", "question2"),
            ("not_duplicate", "duplicate"),
            tsv_columns={"is_duplicate": "label"},
            title="QQP",
        ),
        GlueTask(
            "stsb",
            ("sentence1", "sentence2"),
            None,
            tsv_columns={"score": "label"},
            title="STS-B",
            main_metric="pearson",
        ),
        GlueTask(
            "mnli",
            ("premise", "hypothesis"),
            ("entailment", "neutral", "contradiction"),
            validation_splits=("validation_matched", "validation_mismatched"),
            tsv_columns={"sentence1": "premise", "sentence2": "hypothesis", "gold_label": "label"},
            title="MNLI",
        ),
        GlueTask("qnli", ("question", "sentence"), _NLI, title="QNLI"),
        GlueTask("rte", ("sentence1", "sentence2"), _NLI, title="RTE"),
        GlueTask("wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment"), title="WNLI"),
    )
}
# Metric-name suffix of each extra validation split (the main one keeps plain names).
SPLIT_SUFFIX = {"validation_mismatched": "_mm"}


@dataclass
class GlueDataArguments:
    task_name: str = field(metadata={"help": f"one of: {', '.join(GLUE_TASKS)}"})
    train_file: str | None = field(default=None, metadata={"help": "local csv, json(l) or GLUE .tsv"})
    validation_file: str | None = field(default=None, metadata={"help": "local validation file (MNLI: matched)"})
    validation_mismatched_file: str | None = field(default=None, metadata={"help": "MNLI mismatched dev file"})
    max_length: int = field(default=128, metadata={"help": "tokens per example after truncation"})
    max_train_samples: int | None = field(default=None, metadata={"help": "train on a seeded random subset"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "evaluate on a seeded random subset"})

    def __post_init__(self) -> None:
        self.task_name = self.task_name.lower()
        if self.task_name not in GLUE_TASKS:
            raise ValueError(
                f"--task_name {self.task_name!r} is not a GLUE task; choose one of {', '.join(GLUE_TASKS)}"
            )
        if (self.train_file is None) != (self.validation_file is None):
            raise ValueError("give both --train_file and --validation_file (or neither, to load nyu-mll/glue)")
        if self.validation_mismatched_file is not None and self.task_name != "mnli":
            raise ValueError("--validation_mismatched_file is for --task_name mnli only")
        require_at_least_one(max_train_samples=self.max_train_samples, max_eval_samples=self.max_eval_samples)

    @property
    def local_files(self) -> dict[str, str]:
        """Split name -> local file, empty when the data comes from the Hub."""
        if self.train_file is None:
            return {}
        task = GLUE_TASKS[self.task_name]
        files = {"train": self.train_file, task.validation_splits[0]: self.validation_file}
        if self.validation_mismatched_file is not None:
            files["validation_mismatched"] = self.validation_mismatched_file
        return files


def _tsv_without_header(path: str, task: GlueTask) -> bool:
    """CoLA's train/dev TSVs have no header line: its first row is data (a label in column 2)."""
    if task.headerless is None or table_format(path) != "tsv":
        return False
    first = read_header(path, "\t")
    return "sentence" not in first and len(first) == len(task.headerless)


def load_glue_file(path: str, task: GlueTask) -> datasets.Dataset:
    """One local split with the Hub's column names and integer (or float, STS-B) labels in ``labels``."""
    headerless = _tsv_without_header(path, task)
    dataset = load_table(path, task.headerless if headerless else None)
    renames = {
        old: new
        for old, new in task.tsv_columns.items()
        if old in dataset.column_names and new not in dataset.column_names
    }
    dataset = dataset.rename_columns(renames)
    needed = [*task.text_columns, "label"]
    hint = (
        f"Task {task.name} reads the Hub's nyu-mll/glue column names ({', '.join(needed)})"
        + (f" or the GLUE TSV names ({', '.join(task.tsv_columns)})" if task.tsv_columns else "")
        + "."
    )
    check_columns(dataset, needed, f"{path}", hint)
    dataset = dataset.select_columns(needed)
    return encode_labels(dataset, task.label_names, path, header=not headerless)


def load_glue(data_args: GlueDataArguments) -> dict[str, datasets.Dataset]:
    """Split name -> dataset with the task's text columns and ``labels``."""
    task = GLUE_TASKS[data_args.task_name]
    if data_args.local_files:
        return {split: load_glue_file(path, task) for split, path in data_args.local_files.items()}
    hub = load_hub_dataset(HUB_DATASET, task.name, local_flags="--train_file and --validation_file")
    return {
        split: hub[split].select_columns([*task.text_columns, "label"]).rename_column("label", "labels")
        for split in ("train", *task.validation_splits)
    }


def tokenize(dataset: datasets.Dataset, task: GlueTask, tokenizer: Any, max_length: int) -> datasets.Dataset:
    def encode(batch: dict[str, list]) -> dict[str, list]:
        texts = [batch[c] for c in task.text_columns]
        return tokenizer(*texts, truncation=True, max_length=max_length)

    return dataset.map(encode, batched=True, remove_columns=list(task.text_columns), desc="tokenize")


@cache
def _metric(task_name: str) -> Any:
    import evaluate

    return evaluate.load(str(METRIC_MODULE), task_name)


def glue_metrics(task_name: str, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """GLUE's official metric(s) for ``task_name`` (the local evaluate module); predictions are class ids, or
    scores for stsb."""
    if task_name not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {task_name!r}; known: {', '.join(GLUE_TASKS)}")
    return _metric(task_name).compute(predictions=predictions, references=labels)


def compute_glue_metrics(task: GlueTask) -> MetricFn:
    def compute(output: EvalOutput) -> dict[str, float]:
        if task.label_names is None:
            predictions = output.logits[:, 0]
        else:
            predictions = np.argmax(output.logits, axis=-1)
        return glue_metrics(task.name, predictions, output.labels)

    return compute


def load_task_data(data_args: GlueDataArguments, model_args: ModelArguments, seed: int) -> TaskData:
    """Tokenized, subsampled train and validation splits (MNLI mismatched under the ``_mm`` suffix)."""
    task = GLUE_TASKS[data_args.task_name]
    tokenizer = load_tokenizer(model_args)
    splits = load_glue(data_args)

    def prepare(split: str, limit: int | None) -> datasets.Dataset:
        return tokenize(subsample(splits[split], limit, seed), task, tokenizer, data_args.max_length)

    eval_splits = [s for s in task.validation_splits if s in splits]
    return TaskData(
        task_name=task.name,
        dataset=list(data_args.local_files.values()) or f"{HUB_DATASET}/{task.name}",
        eval_split=eval_splits,
        train=prepare("train", data_args.max_train_samples),
        evals={SPLIT_SUFFIX.get(split, ""): prepare(split, data_args.max_eval_samples) for split in eval_splits},
        label_names=task.label_names,
        compute_metrics=compute_glue_metrics(task),
        main_metric=task.main_metric,
        processor=tokenizer,
        info={
            "max_length": data_args.max_length,
            "eval_subset": any(cuts(splits[split], data_args.max_eval_samples) for split in eval_splits),
        },
    )


GLUE = Task(GlueDataArguments, "AutoModelForSequenceClassification", load_task_data, text_collator)
