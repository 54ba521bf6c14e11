"""``sinkhorn_hf.hub.push`` / ``sinkhorn-hf push``: what gets uploaded, and the refusals (offline, HfApi mocked)."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest
from huggingface_hub import HfApi

from sinkhorn_hf.cli import main
from sinkhorn_hf.compat import upload_selection
from sinkhorn_hf.hub import PushError, push, select_files
from sinkhorn_hf.hub.card import REPO_ID_PLACEHOLDER
from sinkhorn_hf.hub.push import LINK_OUT, select

MODEL_FILES = [
    "README.md",
    "adapter/adapter_config.json",
    "adapter/adapter_model.safetensors",
    "config.json",
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
# Sent only when named with --include: not what a model repository holds.
OTHER = ["eval/predictions.csv"]
NEVER = [".git/HEAD", ".cache/huggingface/upload/model.safetensors.metadata"]
CARD = f'---\nlibrary_name: transformers\ntags:\n- sinkhorn\n---\n\n# run\n\nfrom_pretrained("{REPO_ID_PLACEHOLDER}")\n'


@pytest.fixture
def run_dir(tmp_path) -> Path:
    run = tmp_path / "run"
    for name in MODEL_FILES + TRAINING_STATE + OTHER + NEVER:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(f"contents of {name}")
    (run / "README.md").write_text(CARD)
    return run


def upload_folder_additions(run_dir: Path, upload_kwargs: dict) -> dict[str, bytes]:
    """The reference: what ``upload_folder`` sends given the arguments push passed to it, found as it finds it
    (every file under the folder, links followed, filtered by its patterns and its default ignores): path in the
    repository -> the bytes that would be sent."""
    assert set(upload_kwargs) >= {"folder_path", "allow_patterns"} and "ignore_patterns" not in upload_kwargs
    folder = Path(upload_kwargs["folder_path"]).resolve()
    assert folder == run_dir.resolve()
    listed = {path.relative_to(folder).as_posix(): path for path in sorted(folder.glob("**/*")) if path.is_file()}
    sent = upload_selection(list(listed), allow_patterns=upload_kwargs["allow_patterns"])
    return {name: listed[name].read_bytes() for name in sent}


def files_upload_folder_would_send(run_dir: Path, upload_kwargs: dict) -> list[str]:
    return sorted(upload_folder_additions(run_dir, upload_kwargs))


def uploaded_by_push(run_dir: Path, **push_kwargs) -> tuple[list[str], dict[str, bytes]]:
    """(push's report of the files, what upload_folder would send with the arguments push gave it)."""
    api = mock.Mock(spec=HfApi)
    report = push(run_dir, "me/run", api=api, **push_kwargs)
    return report.files, upload_folder_additions(run_dir, api.upload_folder.call_args.kwargs)


def test_selection_leaves_out_training_state(run_dir):
    assert select_files(run_dir) == MODEL_FILES
    assert select_files(run_dir, include_checkpoints=True) == sorted(MODEL_FILES + TRAINING_STATE)
    # Exactly what upload_folder selects with the arguments push gives it.
    for include_checkpoints in (False, True):
        files, sent = uploaded_by_push(run_dir, include_checkpoints=include_checkpoints)
        assert files == sorted(sent) == select_files(run_dir, include_checkpoints=include_checkpoints)
    left_out = {item.path: item.reason for item in select(run_dir).left_out}
    assert set(left_out) == set(TRAINING_STATE + OTHER + NEVER)
    assert left_out[".git/HEAD"] == "never uploaded: git and huggingface_hub cache files"
    assert left_out["optimizer.bin"] == "training state; add --include-checkpoints to send it"
    assert left_out["eval/predictions.csv"] == "not a model-repo file; add --include 'eval/predictions.csv' to send it"
    assert select_files(run_dir, include=["eval/*"]) == sorted(MODEL_FILES + OTHER)
    assert select_files(run_dir, include=["checkpoints/step_100/model.safetensors"]) == sorted(
        MODEL_FILES + ["checkpoints/step_100/model.safetensors"]
    )


def test_push_creates_repo_and_uploads_the_selection(run_dir):
    api = mock.Mock(spec=HfApi)
    api.upload_folder.return_value = mock.Mock(commit_url="https://huggingface.co/me/run/commit/abc")
    report = push(run_dir, "me/run", private=True, api=api)
    api.create_repo.assert_called_once_with("me/run", private=True, repo_type="model", exist_ok=True)
    kwargs = api.upload_folder.call_args.kwargs
    assert kwargs["folder_path"] == run_dir and kwargs["repo_id"] == "me/run" and kwargs["repo_type"] == "model"
    assert files_upload_folder_would_send(run_dir, kwargs) == report.files == MODEL_FILES
    assert report.commit_url == "https://huggingface.co/me/run/commit/abc"
    # The card's loading snippet now names the repository.
    assert 'from_pretrained("me/run")' in (run_dir / "README.md").read_text()

    push(run_dir, "me/run", include_checkpoints=True, api=api)
    kwargs = api.upload_folder.call_args.kwargs
    assert files_upload_folder_would_send(run_dir, kwargs) == sorted(MODEL_FILES + TRAINING_STATE)


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


SECRETS = {".env": "HF_TOKEN=hf_secret", ".netrc": "machine huggingface.co password hf_secret", "id_rsa": "KEY",
           "key.pem": "KEY", "token": "hf_secret"}  # fmt: skip
TRAINER_STATE = ["rng_state.pth", "trainer_state.json", "training_args.bin"]  # transformers Trainer files


@pytest.fixture
def dangerous_run_dir(run_dir, tmp_path) -> Path:
    """The reported case: secrets, Trainer state, and links leading out of the folder among the model files."""
    for name, content in SECRETS.items():
        (run_dir / name).write_text(content)
    for name in TRAINER_STATE:
        (run_dir / name).write_text(f"contents of {name}")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd").write_text("root:x:0:0 the secret outside")
    (run_dir / "weights.bin").symlink_to(outside / "passwd")
    (run_dir / "pytorch_model.bin").symlink_to(outside / "passwd")  # a model-repo name does not make it safe
    (run_dir / "data").symlink_to(outside)  # a folder outside
    (run_dir / "eval" / "up.csv").symlink_to("../../outside/passwd")  # relative, out through the parent
    (run_dir / "merges.txt").symlink_to(".env")  # inside, but to a file that is not sent
    (run_dir / "adapter" / "config_link.json").symlink_to("../config.json")  # inside, not a model-repo name
    (run_dir / "vocab.txt").symlink_to("tokenizer.json")  # inside, to a file that is sent: sent
    return run_dir


def test_dangerous_files_and_links_out_are_never_sent(dangerous_run_dir):
    run_dir = dangerous_run_dir
    selection = select(run_dir)
    assert selection.files == sorted(MODEL_FILES + ["vocab.txt"])
    left_out = {item.path: item for item in selection.left_out}
    for name in [*SECRETS, "weights.bin"]:
        assert name in left_out
    assert str(left_out[".env"]) == ".env (not a model-repo file; add --include '.env' to send it)"
    for name in TRAINER_STATE:
        assert left_out[name].reason == "training state; add --include-checkpoints to send it"
    outside = str(run_dir.parent / "outside")
    assert str(left_out["weights.bin"]) == f"weights.bin -> {outside}/passwd ({LINK_OUT})"
    for name in ("pytorch_model.bin", "data", "eval/up.csv"):
        assert left_out[name].reason == LINK_OUT
    assert left_out["merges.txt"].reason.startswith("link to .env, which is not sent: not a model-repo file")
    assert left_out["adapter/config_link.json"].reason.startswith("not a model-repo file")

    # Neither --include nor --include-checkpoints lets a link out back in; --include admits what it names.
    everything = select(run_dir, include_checkpoints=True, include=["*", "weights.bin", "data/*"])
    links_out = {"weights.bin", "pytorch_model.bin", "data", "eval/up.csv"}
    assert {item.path for item in everything.left_out} == links_out | set(NEVER)
    # Once .env itself is sent, the link to it inside the folder is too (it sends nothing more).
    assert select_files(run_dir, include=[".env"]) == sorted(MODEL_FILES + ["vocab.txt", ".env", "merges.txt"])

    # What upload_folder sends with push's arguments is the selection, and no byte from outside the folder.
    for push_kwargs in ({}, {"include_checkpoints": True, "include": ["*"]}):
        files, sent = uploaded_by_push(run_dir, **push_kwargs)
        assert sorted(sent) == files == select_files(run_dir, **push_kwargs)
        assert not any(b"the secret outside" in content for content in sent.values())
        assert any(b"hf_secret" in content for content in sent.values()) == bool(push_kwargs)  # only when asked


def test_cli_dry_run_names_what_is_left_out(dangerous_run_dir, capsys):
    run_dir = dangerous_run_dir
    assert main(["push", str(run_dir), "me/run", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    left_out = [line.removeprefix("left out: ") for line in lines if line.startswith("left out: ")]
    assert ".env (not a model-repo file; add --include '.env' to send it)" in left_out
    assert f"weights.bin -> {run_dir.parent / 'outside' / 'passwd'} (link out of the folder)" in left_out
    assert "checkpoints/ (5 files: training state; add --include-checkpoints to send it)" in left_out
    assert "training_args.bin (training state; add --include-checkpoints to send it)" in left_out
    sent = [line.split()[0] for line in lines[1 : lines.index(next(line for line in lines if "left out" in line))]]
    assert sent == select_files(run_dir)
    assert main(["push", str(run_dir), "me/run", "--dry-run", "--include", ".env", "--include", "eval/*"]) == 0
    sent = capsys.readouterr().out
    assert "  .env  (" in sent and "  eval/predictions.csv  (" in sent and "  eval/up.csv  (" not in sent
