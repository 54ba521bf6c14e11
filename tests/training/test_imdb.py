"""IMDB from local csv.gz: truncation, chunking into overlapping windows, per-review evaluation."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, HfArgumentParser

from sinkhorn_hf.training.arguments import ModelArguments, TrainerArguments
from sinkhorn_hf.training.run import run_task
from sinkhorn_hf.training.tasks.imdb import IMDB, ImdbDataArguments, load_imdb, tokenize
from sinkhorn_hf.training.trainer import EXAMPLE_ID


def test_csv_gz_reads_quoted_text(imdb_files):
    splits = load_imdb(ImdbDataArguments(train_file=str(imdb_files[0]), validation_file=str(imdb_files[1])))
    assert len(splits["train"]) == 40 and len(splits["test"]) == 15
    assert splits["train"].column_names == ["text", "labels"]
    assert ', "' in splits["train"][0]["text"]  # the quoted field kept its comma and quotes


def test_chunks_cover_the_review_with_the_given_overlap(tiny_bert, imdb_files):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    args = ImdbDataArguments(
        train_file=str(imdb_files[0]),
        validation_file=str(imdb_files[1]),
        max_length=16,
        long_text_strategy="chunk",
        doc_stride=4,
    )
    reviews = load_imdb(args)["test"]
    chunks = tokenize(reviews, tokenizer, args)
    for review_id, review in enumerate(reviews):
        full = tokenizer(review["text"], add_special_tokens=False)["input_ids"]
        rows = [c for c in chunks if c[EXAMPLE_ID] == review_id]
        assert len(rows) > 1 and all(c["labels"] == review["labels"] for c in rows)
        bodies = [c["input_ids"][1:-1] for c in rows]  # drop [CLS] ... [SEP]
        assert all(len(c["input_ids"]) <= 16 for c in rows)
        rebuilt = bodies[0] + [t for body in bodies[1:] for t in body[4:]]  # consecutive chunks share 4 tokens
        assert rebuilt == full
        assert all(prev[-4:] == nxt[:4] for prev, nxt in zip(bodies, bodies[1:], strict=False))


@pytest.mark.parametrize("strategy", ["truncate", "chunk"])
def test_run_imdb_evaluates_each_review_once(tiny_bert, imdb_files, tmp_path, strategy):
    parser = HfArgumentParser((ModelArguments, ImdbDataArguments, TrainerArguments))
    flags = [
        "--model_name_or_path", str(tiny_bert), "--train_file", str(imdb_files[0]),
        "--validation_file", str(imdb_files[1]), "--max_length", "24", "--long_text_strategy", strategy,
        "--doc_stride", "4", "--output_dir", str(tmp_path), "--num_train_epochs", "2", "--learning_rate", "3e-3",
        "--per_device_eval_batch_size", "4", "--attn_implementation", "sinkhorn",
    ]  # fmt: skip
    result = run_task(IMDB, *parser.parse_args_into_dataclasses(flags))
    assert result.num_eval_samples == {"num_samples": 15}  # reviews, not chunks
    assert set(result.metrics) == {"accuracy", "f1"}
    assert result.task_name == "imdb" and result.long_text_strategy == strategy
    if strategy == "truncate":
        assert result.num_train_samples == 40
    else:
        assert result.num_train_samples > 40  # every chunk is a training row


def test_missing_label_column(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("review,sentiment\nnice,1\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) 'text', 'label' \(it has: review, sentiment\)"):
        load_imdb(ImdbDataArguments(train_file=str(path), validation_file=str(path)))
