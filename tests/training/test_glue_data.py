"""GLUE data from local files: the original TSV layouts, csv/jsonl with the Hub's names, and bad input."""

from __future__ import annotations

import json

import pytest

from sinkhorn_hf.training.tasks.glue import GLUE_TASKS, GlueDataArguments, load_glue, load_glue_file

COLA = (
    "gj04\t1\t\tOur friends won't buy this analysis, let alone the next one we propose.\n"
    'gj04\t0\t*\tHe said "that they left.\n'
    "cj99\t1\t\tNA\n"
)
RTE = (
    "index\tsentence1\tsentence2\tlabel\n"
    '0\tDana said "no.\tDana spoke.\tentailment\n'
    "1\tIt rained.\tThe sun shone all day.\tnot_entailment\n"
)
MRPC = (
    "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    "1\t702876\t702977\tAmrozi accused his brother.\tReferring to him, Amrozi accused his brother.\n"
    "0\t2108705\t2108831\tYucaipa owned Dominick's.\tYucaipa bought Dominick's in 1995.\n"
)
MNLI = (
    "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tlabel1\tgold_label\n"
    "0\t31193\t31193n\tgovernment\tConceptually cream skimming has two dimensions.\tProduct and geography.\t"
    "neutral\tneutral\n"
    "1\t101457\t101457e\ttelephone\tyou know during the season.\tYou lose the things.\tentailment\tentailment\n"
)
STSB = (
    "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane is taking off.\tAn air plane is taking off.\t5.000\n"
    "1\tmain-captions\tMSRvid\t2012test\t0004\tnone\tnone\tA man plays a flute.\tA man plays a bamboo flute.\t3.800\n"
)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_cola_headerless_tsv_read_without_quoting(tmp_path):
    data = load_glue_file(write(tmp_path, "cola.tsv", COLA), GLUE_TASKS["cola"])
    assert data.column_names == ["sentence", "labels"]
    assert list(data["labels"]) == [1, 0, 1]
    assert data[1]["sentence"] == 'He said "that they left.'  # a bare quote does not swallow the next row
    assert data[2]["sentence"] == "NA"  # not turned into a missing value


def test_rte_string_labels_follow_the_hub_ids(tmp_path):
    data = load_glue_file(write(tmp_path, "rte.tsv", RTE), GLUE_TASKS["rte"])
    assert data.column_names == ["sentence1", "sentence2", "labels"]
    assert list(data["labels"]) == [0, 1]  # nyu-mll/glue rte: 0 = entailment, 1 = not_entailment
    assert data[0]["sentence1"] == 'Dana said "no.'


def test_mrpc_and_stsb_tsv_columns_map_to_hub_names(tmp_path):
    mrpc = load_glue_file(write(tmp_path, "mrpc.tsv", MRPC), GLUE_TASKS["mrpc"])
    assert mrpc[0] == {
        "sentence1": "Amrozi accused his brother.",
        "sentence2": "Referring to him, Amrozi accused his brother.",
        "labels": 1,
    }
    stsb = load_glue_file(write(tmp_path, "stsb.tsv", STSB), GLUE_TASKS["stsb"])
    assert list(stsb["labels"]) == pytest.approx([5.0, 3.8])


def test_mnli_local_files_give_matched_and_mismatched(tmp_path):
    args = GlueDataArguments(
        task_name="MNLI",
        train_file=write(tmp_path, "train.tsv", MNLI),
        validation_file=write(tmp_path, "dev_matched.tsv", MNLI),
        validation_mismatched_file=write(tmp_path, "dev_mismatched.tsv", MNLI),
    )
    splits = load_glue(args)
    assert set(splits) == {"train", "validation_matched", "validation_mismatched"}
    assert splits["train"].column_names == ["premise", "hypothesis", "labels"]
    assert list(splits["validation_mismatched"]["labels"]) == [1, 0]  # neutral, entailment


def test_csv_and_jsonl_with_hub_names(tmp_path):
    csv_path = write(tmp_path, "rte.csv", 'sentence1,sentence2,label\n"A, b.",C.,1\nD.,E.,entailment\n')
    data = load_glue_file(csv_path, GLUE_TASKS["rte"])
    assert data[0]["sentence1"] == "A, b." and list(data["labels"]) == [1, 0]
    rows = [{"sentence": "fine", "label": 1}, {"sentence": "dull", "label": 0}]
    jsonl = write(tmp_path, "sst2.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    assert list(load_glue_file(jsonl, GLUE_TASKS["sst2"])["labels"]) == [1, 0]


def test_missing_column_is_named(tmp_path):
    path = write(tmp_path, "rte.tsv", "index\tsentence1\tlabel\n0\tA.\tentailment\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) 'sentence2' \(it has: index, sentence1, label\)"):
        load_glue_file(path, GLUE_TASKS["rte"])


def test_unknown_label_lists_the_allowed_ones(tmp_path):
    path = write(tmp_path, "rte.tsv", "index\tsentence1\tsentence2\tlabel\n0\tA.\tB.\tcontradiction\n")
    with pytest.raises(ValueError, match="label 'contradiction' is not one of: 0 or 'entailment', 1 or"):
        load_glue_file(path, GLUE_TASKS["rte"])


def test_unsupported_file_type(tmp_path):
    with pytest.raises(ValueError, match=r"unsupported data file; expected one of \.csv, \.tsv, \.json, \.jsonl"):
        load_glue_file(write(tmp_path, "rte.parquet", ""), GLUE_TASKS["rte"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(task_name="sst-2"), "'sst-2' is not a GLUE task; choose one of cola, sst2"),
        (dict(task_name="rte", train_file="a.tsv"), "give both --train_file and --validation_file"),
        (dict(task_name="rte", validation_mismatched_file="b.tsv"), "for --task_name mnli only"),
    ],
)
def test_bad_data_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GlueDataArguments(**kwargs)


@pytest.mark.slow
def test_stsb_regression_and_mnli_mismatched_end_to_end(tiny_bert, tmp_path):
    from transformers import HfArgumentParser

    from sinkhorn_hf.training.arguments import ModelArguments, TrainerArguments
    from sinkhorn_hf.training.run import run_task
    from sinkhorn_hf.training.tasks.glue import GLUE

    parser = HfArgumentParser((ModelArguments, GlueDataArguments, TrainerArguments))
    common = ["--model_name_or_path", str(tiny_bert), "--max_train_steps", "2", "--attn_implementation", "sinkhorn"]
    stsb = write(tmp_path, "stsb.tsv", STSB)
    result = run_task(
        GLUE,
        *parser.parse_args_into_dataclasses(
            [*common, "--task_name", "stsb", "--train_file", stsb, "--validation_file", stsb,
             "--output_dir", str(tmp_path / "stsb")]
        )
    )  # fmt: skip
    assert set(result.metrics) == {"pearson", "spearmanr"}
    mnli = write(tmp_path, "mnli.tsv", MNLI)
    result = run_task(
        GLUE,
        *parser.parse_args_into_dataclasses(
            [*common, "--task_name", "mnli", "--train_file", mnli, "--validation_file", mnli,
             "--validation_mismatched_file", mnli, "--output_dir", str(tmp_path / "mnli")]
        )
    )  # fmt: skip
    assert set(result.metrics) == {"accuracy", "accuracy_mm"}
    assert result.metrics["accuracy"] == result.metrics["accuracy_mm"]  # the same file twice
    assert result.eval_split == ["validation_matched", "validation_mismatched"]
