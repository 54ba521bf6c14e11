"""Data that cannot train a sound model is refused up front, naming the file (and row) and what is wrong."""

from __future__ import annotations

import gzip

import datasets
import pytest

from sinkhorn_hf.training.tasks.glue import GLUE_TASKS, GlueDataArguments, load_glue, load_glue_file
from sinkhorn_hf.training.tasks.images import ImageDataArguments
from sinkhorn_hf.training.tasks.imdb import ImdbDataArguments, load_imdb

STSB_HEADER = "sentence1\tsentence2\tscore\n"


@pytest.mark.parametrize("label", ["nan", "NaN", "inf", "-inf", "Infinity"])
def test_non_finite_regression_labels_are_refused_with_file_and_row(tmp_path, label):
    path = tmp_path / "stsb.tsv"
    path.write_text(STSB_HEADER + "A plane.\tA jet.\t5.0\nA man.\tA flute.\t3.8\n" + f"A cat.\tA dog.\t{label}\n")
    with pytest.raises(ValueError, match=rf"stsb.tsv, line 4: regression label '{label}' is not a finite number"):
        load_glue_file(str(path), GLUE_TASKS["stsb"])


SST2_ROWS = "sentence\tlabel\ngood film\t1\n\nbad film\t0\n"  # a blank line (skipped) before line 4


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("dev.tsv", SST2_ROWS + "fine\t7\n", r"dev.tsv, line 5: label '7' is not one of: 0 or 'negative', 1 or"),
        (
            "dev.tsv",
            SST2_ROWS + "a\ttab\t1\n",
            r"dev.tsv, line 5: an extra field .*3 fields, expected 2 \(sentence, la",
        ),
        ("dev.tsv", SST2_ROWS + "no label\n", r"dev.tsv, line 5: a field is missing: 1 fields, expected 2"),
        ("dev.csv", 'sentence,label\n"two\nlines",1\nx,neutral\n', r"dev.csv, line 4: label 'neutral' is not one of"),
        ("dev.csv", 'sentence,label\n"a, b",1,0\n', r"dev.csv, line 2: an extra field: 3 fields, expected 2"),
        (
            "dev.jsonl",
            '{"sentence": "a", "label": 1}\n\n{"sentence": "b", "label": 2}\n',
            r"dev.jsonl, line 3: label 2 ",
        ),
        ("dev.jsonl", '{"sentence": "a", "label": 1}\n{"sentence": "b",\n', r"dev.jsonl, line 2: not valid JSON"),
        (
            "dev.jsonl",
            '{"sentence": "a", "label": 1}\n{"sentence": "b"}\n',
            r"dev.jsonl, line 2: label None is not one",
        ),
    ],
)
def test_a_bad_row_is_refused_naming_the_file_and_its_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_glue_file(str(path), GLUE_TASKS["sst2"])


def test_a_bad_label_in_a_headerless_cola_file_names_its_line(tmp_path):
    path = tmp_path / "cola.tsv"
    path.write_text("gj04\t1\t\tA sentence.\ngj04\t5\t*\tAnother one.\n")
    with pytest.raises(ValueError, match=r"cola.tsv, line 2: label '5' is not one of"):
        load_glue_file(str(path), GLUE_TASKS["cola"])


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("train.tsv", "", r"train.tsv is empty: expected a header line"),
        ("train.csv", "", r"train.csv is empty: expected a header line"),
        ("train.tsv", "sentence\tlabel\n", r"train.tsv has a header \(sentence, label\) but no rows"),
        ("train.csv", "sentence,label\n", r"train.csv has a header \(sentence, label\) but no rows"),
        ("train.jsonl", "\n", r"train.jsonl is empty: expected one JSON object per line"),
    ],
)
def test_empty_and_header_only_files_name_the_file(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nit was good\t1\n")
    args = GlueDataArguments(
        task_name="sst2", train_file=str(tmp_path / name), validation_file=str(tmp_path / "dev.tsv")
    )
    with pytest.raises(ValueError, match=message):
        load_glue(args)


def test_a_header_only_gzip_csv_names_the_file(tmp_path):
    with gzip.open(tmp_path / "test.csv.gz", "wt") as file:
        file.write("text,label\n")
    (tmp_path / "train.csv").write_text("text,label\nit was good,1\n")
    args = ImdbDataArguments(train_file=str(tmp_path / "train.csv"), validation_file=str(tmp_path / "test.csv.gz"))
    with pytest.raises(ValueError, match=r"test.csv.gz has a header \(text, label\) but no rows"):
        load_imdb(args)


@pytest.mark.parametrize("flag", ["max_train_samples", "max_eval_samples"])
@pytest.mark.parametrize("value", [0, -3])
def test_sample_limits_below_one_are_refused_by_every_task(flag, value):
    message = rf"--{flag} must be >= 1, got {value}"
    with pytest.raises(ValueError, match=message):
        GlueDataArguments(task_name="sst2", **{flag: value})
    with pytest.raises(ValueError, match=message):
        ImdbDataArguments(**{flag: value})
    with pytest.raises(ValueError, match=message):
        ImageDataArguments(dataset_name="cifar10", **{flag: value})


def test_a_bad_sample_limit_on_the_command_line_is_a_usage_error(capsys):
    """Refused while the command line is parsed: argparse's usage message and exit status 2, no traceback."""
    from sinkhorn_hf.training.run import main
    from sinkhorn_hf.training.tasks.glue import GLUE

    argv = ["--model_name_or_path", "m", "--task_name", "sst2", "--output_dir", "o", "--max_train_samples", "0"]
    with pytest.raises(SystemExit) as exit_info:
        main(GLUE, argv)
    assert exit_info.value.code == 2
    assert "error: --max_train_samples must be >= 1, got 0" in capsys.readouterr().err


def test_an_unreachable_hub_dataset_names_the_local_file_flags(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # read once, when datasets was imported
    with pytest.raises(ConnectionError, match="cannot load the Hub dataset nyu-mll/glue \\(sst2\\).*pass local files "
                       "instead: --train_file and --validation_file"):  # fmt: skip
        load_glue(GlueDataArguments(task_name="sst2"))
