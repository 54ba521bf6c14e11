"""``sinkhorn_hf.hub.card`` / ``sinkhorn-hf card``: cards huggingface_hub parses, with a snippet that runs."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from hub_helpers import fenced_blocks, python_snippet, run_snippet, text_batch, trainer_results, write_results
from huggingface_hub import ModelCard, ModelCardData, metadata_eval_result
from huggingface_hub.repocard_data import model_index_to_eval_results

from sinkhorn_hf.cli import main
from sinkhorn_hf.hub import CardError, build_card, convert, write_card
from sinkhorn_hf.hub.card import REPO_ID_PLACEHOLDER, SINKHORN_TAGS


@pytest.fixture(scope="module")
def saved_run(tiny_bert, tmp_path_factory) -> Path:
    """A converted tiny BERT (K=3) reloaded and saved with save_pretrained, as the trainer leaves a run."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    converted = convert(tiny_bert, tmp_path_factory.mktemp("converted") / "model", iterations=3).output_dir
    run = tmp_path_factory.mktemp("saved-run")
    AutoModelForSequenceClassification.from_pretrained(converted).save_pretrained(run)
    AutoTokenizer.from_pretrained(converted).save_pretrained(run)
    return run


@pytest.fixture
def run_dir(saved_run, tmp_path) -> Path:
    return Path(shutil.copytree(saved_run, tmp_path / "sst2-run"))


def test_card_metadata_is_what_huggingface_hub_parses(run_dir):
    """A run evaluated on the whole validation split of the Hub's GLUE SST-2 claims it in model-index."""
    write_results(run_dir, trainer_results(dataset="nyu-mll/glue/sst2", eval_subset=False))
    path = write_card(run_dir)
    card = ModelCard.load(path)  # parses the YAML and the model-index, raising on anything malformed
    data = card.data
    assert data.base_model == "google-bert/bert-base-uncased"
    assert data.library_name == "transformers" and data.pipeline_tag == "text-classification"
    assert data.tags == SINKHORN_TAGS and data.datasets == ["nyu-mll/glue"]
    assert data.metrics == ["accuracy", "loss"]
    # Only keys the Hub's model card metadata knows.
    known = set(ModelCardData.__init__.__code__.co_varnames) | {"model-index"}
    assert set(data.to_dict()) <= known

    # The model-index entry equals the one huggingface_hub builds itself from the same facts.
    reference = metadata_eval_result(
        model_pretty_name="sst2-run",
        task_pretty_name="Text classification",
        task_id="text-classification",
        metrics_pretty_name="Accuracy",
        metrics_id="accuracy",
        metrics_value=0.8761,
        dataset_pretty_name="GLUE SST-2",
        dataset_id="nyu-mll/glue",
        dataset_config="sst2",
        dataset_split="validation",
    )
    name, expected = model_index_to_eval_results(reference["model-index"])
    assert data.model_name == name == "sst2-run"
    assert data.eval_results[0] == replace(expected[0], verified=None)  # unset rather than claimed False
    assert [(r.metric_type, r.metric_value) for r in data.eval_results] == [("accuracy", 0.8761), ("loss", 0.3125)]
    # Saving the parsed card gives back the same text: nothing was lost or reinterpreted.
    assert str(ModelCard(path.read_text())) == path.read_text()


def test_card_body_has_settings_command_results_and_citations(run_dir):
    write_results(run_dir, trainer_results(adjoint="heun", lora={"r": 8, "alpha": 16, "target_modules": ["query"]}))
    text = write_card(run_dir).read_text()
    assert "| `sinkhorn_iterations` | 3 |" in text and "| `attn_implementation` | `sinkhorn` |" in text
    assert f"```bash\n{trainer_results()['command']}\n```" in text
    assert "| Accuracy | validation | 872 | 0.8761 |" in text
    assert "read from `/data/glue/SST-2/train.tsv, /data/glue/SST-2/dev.tsv`" in text
    assert "| training samples | 8000 |" in text and "| peak memory | 2100 MB (host_max_rss) |" in text
    assert "r=8, alpha=16, target_modules=['query']" in text
    assert 'sinkhorn_hf.enable_adjoint(model, scheme="heun")' in text  # heun changes the forward
    assert "Sinkformers: Transformers with Doubly Stochastic Attention" in text and "AISTATS" in text
    assert "Do Residual Neural Networks discretize Neural Ordinary Differential Equations?" in text
    assert "NeurIPS" in text


def test_loading_snippet_runs_and_gets_sinkhorn(run_dir):
    write_results(run_dir, trainer_results())
    code = python_snippet(write_card(run_dir).read_text())
    assert REPO_ID_PLACEHOLDER in code
    printed = run_snippet(code.replace(REPO_ID_PLACEHOLDER, str(run_dir)))
    assert printed.split() == ["sinkhorn", "3"]

    text = build_card(run_dir, repo_id="someone/tiny-sinkhorn").content
    assert REPO_ID_PLACEHOLDER not in text and 'from_pretrained("someone/tiny-sinkhorn")' in text
    assert text.splitlines()[text.splitlines().index("---", 1) + 2] == "# tiny-sinkhorn"


def test_snippet_loads_a_stored_residual_scale(run_dir):
    """A residual scale lives in config.json and is applied at load (after ``import sinkhorn_hf``): the snippet's
    model computes the scaled function, not the unscaled one."""
    import torch
    from transformers import AutoModelForSequenceClassification

    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "adjoint_residual_scale": 0.5}))
    write_results(run_dir, trainer_results())
    text = write_card(run_dir).read_text()
    assert "| `adjoint_residual_scale` | 0.5" in text
    code = python_snippet(text)
    assert "enable_adjoint" not in code and "residual scale (0.5)" in code
    namespace: dict = {}
    run_snippet(code.replace(REPO_ID_PLACEHOLDER, str(run_dir)), namespace)

    inputs = text_batch(run_dir)
    unscaled = AutoModelForSequenceClassification.from_pretrained(run_dir, adjoint_residual_scale=None).eval()
    scaled = AutoModelForSequenceClassification.from_pretrained(run_dir).eval()
    scaled_by_hand = AutoModelForSequenceClassification.from_pretrained(run_dir, adjoint_residual_scale=None).eval()
    with torch.no_grad():
        plain = unscaled(**inputs).logits
        import sinkhorn_hf

        sinkhorn_hf.enable_adjoint(scaled_by_hand, scheme="off", residual_scale=0.5)
        expected = scaled_by_hand(**inputs).logits
        assert torch.equal(namespace["model"].eval()(**inputs).logits, expected)
        assert torch.equal(scaled(**inputs).logits, expected)
    assert (expected - plain).abs().max() > 1e-3


def test_converted_model_card_without_results(tiny_bert, tmp_path):
    out = convert(tiny_bert, tmp_path / "converted", iterations=1, command="sinkhorn-hf convert SRC OUT").output_dir
    with pytest.warns(UserWarning, match="local path .*--base-model"):
        card = ModelCard.load(write_card(out))
    assert card.data.base_model is None and card.data.eval_results is None and card.data.tags == SINKHORN_TAGS
    assert "not been fine-tuned" in card.text and "sinkhorn-hf convert SRC OUT" in card.text
    assert "## Evaluation" not in card.text
    printed = run_snippet(python_snippet(card.text).replace(REPO_ID_PLACEHOLDER, str(out)))
    assert printed.split() == ["sinkhorn", "1"]
    assert build_card(out, base_model="prajjwal1/bert-tiny").data.base_model == "prajjwal1/bert-tiny"
    with pytest.raises(CardError, match="not a Hub model id"):
        build_card(out, base_model=str(tiny_bert))


def test_base_model_is_followed_through_a_local_conversion(tiny_bert, run_dir, tmp_path):
    converted = convert(tiny_bert, tmp_path / "converted", iterations=3).output_dir
    write_results(run_dir, trainer_results(model_name_or_path=str(converted)))
    with pytest.warns(UserWarning, match=f"local path {tiny_bert}"):
        assert build_card(run_dir).data.base_model is None
    record = json.loads((converted / "sinkhorn_conversion.json").read_text())
    (converted / "sinkhorn_conversion.json").write_text(json.dumps({**record, "source": "prajjwal1/bert-tiny"}))
    assert build_card(run_dir).data.base_model == "prajjwal1/bert-tiny"


def test_mnli_metrics_go_to_their_splits(run_dir):
    results = trainer_results(
        task_name="mnli",
        dataset="nyu-mll/glue/mnli",
        eval_split=["validation_matched", "validation_mismatched"],
        eval_subset=False,
        metrics={"accuracy": 0.81, "accuracy_mm": 0.82},
        num_eval_samples={"num_samples": 9815, "num_samples_mm": 9832},
    )
    write_results(run_dir, results)
    data = ModelCard.load(write_card(run_dir)).data
    assert [(r.dataset_config, r.dataset_split, r.metric_type, r.metric_value) for r in data.eval_results] == [
        ("mnli", "validation_matched", "accuracy", 0.81),
        ("mnli", "validation_mismatched", "accuracy", 0.82),
    ]
    write_results(run_dir, {**results, "metrics": {"accuracy": 0.81, "f1": 0.8}})
    with pytest.raises(CardError, match="2 evaluation splits"):
        build_card(run_dir)


def test_hub_dataset_ids(run_dir):
    imdb = trainer_results(task_name="imdb", dataset="stanfordnlp/imdb", eval_split="test", eval_subset=False)
    write_results(run_dir, imdb)
    data = build_card(run_dir).data
    assert data.datasets == ["stanfordnlp/imdb"] and data.eval_results[0].dataset_name == "IMDB"
    assert data.eval_results[0].dataset_type == "stanfordnlp/imdb" and data.eval_results[0].dataset_split == "test"
    write_results(run_dir, trainer_results(task_name="reviews", dataset=["/data/reviews.csv"], eval_split="test"))
    card = build_card(run_dir)
    assert card.data.datasets is None and card.data.eval_results[0].dataset_type == "local-evaluation"
    assert card.data.eval_results[0].dataset_name == "reviews (local files): 872 examples"
    assert "reviews (local files)" in card.text


def _claims(card) -> set[tuple]:
    return {(r.dataset_type, r.dataset_config, r.dataset_split) for r in card.data.eval_results}


def test_a_subset_evaluation_claims_no_canonical_split_and_states_its_count(run_dir):
    """32 of SST-2's 872 dev rows (--max_eval_samples 32), from the Hub: no model-index entry names nyu-mll/glue
    or the validation split; the metadata and the text give the count and say it is a subset."""
    subset = trainer_results(dataset="nyu-mll/glue/sst2", eval_subset=True, num_eval_samples={"num_samples": 32})
    write_results(run_dir, subset)
    card = build_card(run_dir)
    assert _claims(card) == {("subset-evaluation", None, None)}
    assert card.data.eval_results[0].dataset_name == "a subset of GLUE SST-2 validation: 32 examples"
    assert card.data.datasets == ["nyu-mll/glue"]  # the training data did come from there
    assert "On **a subset** of GLUE SST-2" in card.text and "| Accuracy | validation | 32 | 0.8761 |" in card.text
    write_results(run_dir, {**subset, "eval_subset": None})  # a results.json that does not say: no claim either
    assert _claims(build_card(run_dir)) == {("subset-evaluation", None, None)}


def test_local_files_claim_no_canonical_split_and_name_the_files(run_dir):
    write_results(run_dir, trainer_results(eval_subset=False, num_eval_samples={"num_samples": 872}))
    card = build_card(run_dir)
    assert _claims(card) == {("local-evaluation", None, None)} and card.data.datasets is None
    assert card.data.eval_results[0].dataset_name == "GLUE SST-2 (local files): 872 examples"
    assert "read from `/data/glue/SST-2/train.tsv, /data/glue/SST-2/dev.tsv`" in card.text
    assert "On the local evaluation file(s) named above" in card.text
    write_results(run_dir, trainer_results(eval_subset=True, num_eval_samples={"num_samples": 32}))
    card = build_card(run_dir)  # 32 of the local dev file's rows (--max_eval_samples 32)
    assert _claims(card) == {("local-evaluation", None, None)}
    assert card.data.eval_results[0].dataset_name == "a subset of GLUE SST-2 (local files) validation: 32 examples"
    assert "On **a subset** of the local evaluation file(s)" in card.text


def test_an_architecture_that_is_not_a_class_name_is_refused(run_dir):
    """Issue 17: config.json ``architectures`` goes into the loading snippet's code; a crafted name would close the
    fence and put HTML into the page."""
    config = json.loads((run_dir / "config.json").read_text())
    config["architectures"] = ["Foo\n```\n<script>alert(1)</script>\n```python"]
    (run_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CardError, match="architecture .* is not a class name"):
        write_card(run_dir)
    assert not (run_dir / "README.md").exists()
    # the other config value the snippet shows: a residual scale must be a number
    del config["architectures"]
    (run_dir / "config.json").write_text(json.dumps({**config, "adjoint_residual_scale": "0.5)\n```\n<b>x</b>"}))
    with pytest.raises(CardError, match="adjoint_residual_scale must be a number"):
        write_card(run_dir)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not valid JSON: .*line 1"),
        ("[1, 2]", "must hold a JSON object"),
        (json.dumps({k: v for k, v in trainer_results().items() if k != "metrics"}), "has no 'metrics'"),
        (json.dumps(trainer_results(metrics={"accuracy": "high"})), "metric 'accuracy' must be a finite number"),
        (json.dumps(trainer_results(metrics={"accuracy": float("nan")})), "metric 'accuracy' must be a finite"),
        (json.dumps(trainer_results(sinkhorn_iterations="3")), "'sinkhorn_iterations' must be int or null"),
        (json.dumps(trainer_results(num_train_samples=True)), "'num_train_samples' must be int or null"),
        (json.dumps(trainer_results(eval_split=["validation", 3])), "'eval_split' must be a string or a list"),
    ],
)
def test_malformed_results_are_clear_errors(run_dir, content, message):
    (run_dir / "results.json").write_text(content)
    with pytest.raises(CardError, match=message):
        build_card(run_dir)
    assert not (run_dir / "README.md").exists()


def test_results_of_another_model_are_refused(run_dir):
    write_results(run_dir, trainer_results(sinkhorn_iterations=5))
    with pytest.raises(CardError, match="sinkhorn_iterations=5 but the saved config.json has 3"):
        build_card(run_dir)
    write_results(run_dir, trainer_results(attn_implementation="sdpa", sinkhorn_iterations=None))
    with pytest.raises(CardError, match="attn_implementation='sdpa' but the saved config.json has 'sinkhorn'"):
        build_card(run_dir)


def test_softmax_baseline_gets_no_sinkhorn_tags(tiny_bert, tmp_path):
    run = Path(shutil.copytree(tiny_bert, tmp_path / "baseline"))
    write_results(run, trainer_results(attn_implementation="sdpa", sinkhorn_iterations=None))
    card = build_card(run)
    assert card.data.tags is None and "SoftMax baseline" in card.text and "| `sinkhorn_iterations` |" not in card.text


def test_run_without_a_model_is_refused(tmp_path):
    with pytest.raises(CardError, match="no config.json: save the model there"):
        build_card(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(CardError, match="LoRA.*adapter without its model: merge.*merge_and_unload"):
        build_card(tmp_path)


def test_cli_writes_card_and_reports_errors(run_dir, tmp_path, capsys):
    results = write_results(tmp_path, trainer_results())
    assert main(["card", str(run_dir), "--results", str(results), "--license", "apache-2.0"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {run_dir / 'README.md'}"
    assert ModelCard.load(run_dir / "README.md").data.license == "apache-2.0"
    with pytest.raises(SystemExit, match="sinkhorn-hf card: error: results file .* does not exist"):
        main(["card", str(run_dir), "--results", str(tmp_path / "missing.json")])
    with pytest.raises(SystemExit, match="RUN_DIR .*nowhere: this folder does not exist") as stop:
        main(["card", str(tmp_path / "nowhere")])
    assert stop.value.code == 2


INJECTED = "# Heading\n<script>alert(1)</script> | cell ```\n```\n# Heading"


def test_results_fields_cannot_inject_markdown_or_html(run_dir):
    """Text from results.json (task, metric, split and path names, the command) is shown, never interpreted: no
    heading, no HTML element, no table cell or code fence of its own."""
    command = f"python run.py --note '{INJECTED}'"
    results = trainer_results(
        model_name_or_path=f"/models/{INJECTED}",
        task_name=f"task {INJECTED}",
        dataset=[f"/data/{INJECTED}.csv"],
        eval_split=f"split {INJECTED}",
        metrics={f"acc {INJECTED}": 0.5},
        command=command,
        peak_memory_kind=INJECTED,
    )
    write_results(run_dir, results)
    with pytest.warns(UserWarning, match="local path"):
        path = write_card(run_dir)
    card = ModelCard.load(path)  # the metadata block still parses, with the names as they are
    assert card.data.eval_results[0].metric_name == f"acc {INJECTED}"
    assert card.data.eval_results[0].dataset_split is None  # local files: no split is claimed
    outside, blocks = fenced_blocks(card.text)  # every fence is closed
    assert command in blocks  # the command verbatim in its own block, the injected fence inside it
    headings = [line for line in outside if line.lstrip().startswith("#")]
    assert headings == ["# sst2-run", "## Attention", "## Training", "## Evaluation", "## How to load", "## Citation"]
    assert not any("<script" in line.lower() for line in outside)
    assert card.text.count("<script") == 1  # only inside the command's code block
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &#124; cell &#96;&#96;&#96;" in card.text  # shown as written
    # Every table row keeps its own cells: the injected "|" is an entity, not a border.
    rows = [line for line in outside if line.startswith("|")]
    assert {line.count("|") for line in rows} == {3, 5}  # settings and training tables; metric, split, count, value
    assert [line.count("|") for line in rows if line.startswith("| acc ")] == [5]


def test_repo_id_must_be_a_hub_id(run_dir):
    with pytest.raises(CardError, match="is not a Hub repository id"):
        build_card(run_dir, repo_id='me/x"); import os; ("')
