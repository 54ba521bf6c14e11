"""``sinkhorn_hf.hub.push`` / ``sinkhorn-hf push``: what gets uploaded, and the refusals (offline, HfApi mocked)."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest
from huggingface_hub import HfApi
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS

from sinkhorn_hf.cli import main
from sinkhorn_hf.hub import PushError, push, select_files
from sinkhorn_hf.hub.card import REPO_ID_PLACEHOLDER
from sinkhorn_hf.hub.push import CHECKPOINT_PATTERNS

MODEL_FILES = [
    "README.md",
    "config.json",
    "eval/predictions.csv",
    "model.safetensors",
    "results.json",
    "tokenizer.json",
    "tokenizer_config.json",
]
TRAINING_STATE = [
    # accelerate save_state, as sinkhorn_hf's trainer lays it out and with automatic checkpoint naming
    "checkpoints/step_100/model.safetensors",
    "checkpoints/step_100/optimizer.bin",
    "checkpoints/step_100/scheduler.bin",
    "checkpoints/step_100/random_states_0.pkl",
    "checkpoints/step_100/trainer_state.json",
    "checkpoint_0/optimizer.bin",
    # transformers Trainer folders
    "checkpoint-500/model.safetensors",
    "checkpoint-500/optimizer.pt",
    # stray training state at the top and tensorboard logs
    "optimizer.bin",
    "scheduler.bin",
    "sampler.bin",
    "scaler.pt",
    "random_states_1.pkl",
    "runs/sst2/events.out.tfevents.1700000000.host",
]
NEVER = [".git/HEAD", ".cache/huggingface/upload/model.safetensors.metadata"]
CARD = f'---\nlibrary_name: transformers\ntags:\n- sinkhorn\n---\n\n# run\n\nfrom_pretrained("{REPO_ID_PLACEHOLDER}")\n'


@pytest.fixture
def run_dir(tmp_path) -> Path:
    run = tmp_path / "run"
    for name in MODEL_FILES + TRAINING_STATE + NEVER:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(f"contents of {name}")
    (run / "README.md").write_text(CARD)
    return run


def files_upload_folder_would_send(run_dir: Path, ignore_patterns: list[str]) -> list[str]:
    """The reference: huggingface_hub's own selection inside upload_folder (its Hub YAML check stubbed)."""
    with mock.patch.object(HfApi, "_validate_yaml"):
        additions = HfApi()._prepare_upload_folder_additions(
            run_dir,
            "",
            ignore_patterns=ignore_patterns + DEFAULT_IGNORE_PATTERNS,  # as upload_folder adds them
        )
    return sorted(op.path_in_repo for op in additions)


def test_selection_leaves_out_training_state(run_dir):
    assert select_files(run_dir) == MODEL_FILES
    assert select_files(run_dir, include_checkpoints=True) == sorted(MODEL_FILES + TRAINING_STATE)
    # Exactly what upload_folder selects with the patterns push gives it.
    assert select_files(run_dir) == files_upload_folder_would_send(run_dir, list(CHECKPOINT_PATTERNS))
    assert select_files(run_dir, include_checkpoints=True) == files_upload_folder_would_send(run_dir, [])


def test_push_creates_repo_and_uploads_the_selection(run_dir):
    api = mock.Mock(spec=HfApi)
    api.upload_folder.return_value = mock.Mock(commit_url="https://huggingface.co/me/run/commit/abc")
    report = push(run_dir, "me/run", private=True, api=api)
    api.create_repo.assert_called_once_with("me/run", private=True, repo_type="model", exist_ok=True)
    kwargs = api.upload_folder.call_args.kwargs
    assert kwargs["folder_path"] == run_dir and kwargs["repo_id"] == "me/run" and kwargs["repo_type"] == "model"
    assert files_upload_folder_would_send(run_dir, kwargs["ignore_patterns"]) == report.files == MODEL_FILES
    assert report.commit_url == "https://huggingface.co/me/run/commit/abc"
    # The card's loading snippet now names the repository.
    assert 'from_pretrained("me/run")' in (run_dir / "README.md").read_text()

    push(run_dir, "me/run", include_checkpoints=True, api=api)
    assert api.upload_folder.call_args.kwargs["ignore_patterns"] == []


def test_dry_run_sends_and_changes_nothing(run_dir):
    api = mock.Mock(spec=HfApi)
    report = push(run_dir, "me/run", dry_run=True, api=api)
    assert report.files == MODEL_FILES and report.commit_url is None
    assert api.mock_calls == [] and (run_dir / "README.md").read_text() == CARD


def test_refuses_without_a_card(run_dir):
    api = mock.Mock(spec=HfApi)
    (run_dir / "README.md").unlink()
    with pytest.raises(PushError, match="has no README.md model card; write one with `sinkhorn-hf card"):
        push(run_dir, "me/run", api=api)
    (run_dir / "README.md").write_text("# a card without metadata\n")
    with pytest.raises(PushError, match="no metadata block"):
        push(run_dir, "me/run", dry_run=True, api=api)
    (run_dir / "README.md").write_text("---\nmodel-index:\n- results: [{}]\n---\n# broken\n")
    with pytest.raises(PushError, match="invalid metadata"):
        push(run_dir, "me/run", api=api)
    assert api.mock_calls == []


def test_refuses_bad_repo_id_missing_dir_and_missing_token(run_dir, tmp_path, monkeypatch):
    with pytest.raises(PushError, match="not a valid Hub repository id"):
        push(run_dir, "me/not a name", dry_run=True)
    with pytest.raises(PushError, match="does not exist"):
        push(tmp_path / "nowhere", "me/run", dry_run=True)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(PushError, match="no Hugging Face token found: run `hf auth login` or set HF_TOKEN"):
        push(run_dir, "me/run")
    assert (run_dir / "README.md").read_text() == CARD


def test_cli_dry_run_lists_files(run_dir, capsys):
    assert main(["push", str(run_dir), "me/run", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"would upload {len(MODEL_FILES)} files") and lines[0].endswith("to me/run:")
    assert [line.split()[0] for line in lines[1 : 1 + len(MODEL_FILES)]] == MODEL_FILES
    assert lines[-1] == "README.md: would fill in the repository id me/run"
    (run_dir / "README.md").unlink()
    with pytest.raises(SystemExit, match="sinkhorn-hf push: error: .*no README.md"):
        main(["push", str(run_dir), "me/run", "--dry-run"])
