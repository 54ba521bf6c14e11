"""Share a run directory on the Hugging Face Hub: the model, its tokenizer, results and card, not its checkpoints.

The file selection uses huggingface_hub's own filter (the one ``upload_folder`` applies), so a dry run lists
exactly what an upload sends.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard

from ..compat import has_card_metadata, upload_selection
from .card import CARD_FILE, REPO_ID_PLACEHOLDER

# Training state that is not the model: accelerate save_state folders and files (checkpoints/checkpoint_N,
# optimizer.bin, scheduler.bin, sampler.bin, scaler.pt, random_states_N.pkl, custom_checkpoint_N.pkl),
# transformers Trainer folders (checkpoint-N) and tensorboard logs. fnmatch's * also matches "/".
CHECKPOINT_PATTERNS = (
    "checkpoints/*",
    "*/checkpoints/*",
    "checkpoint-*",
    "*/checkpoint-*",
    "checkpoint_*",
    "*/checkpoint_*",
    "*optimizer.bin",
    "*optimizer.pt",
    "*scheduler.bin",
    "*scheduler.pt",
    "*sampler.bin",
    "*scaler.pt",
    "*random_states*",
    "*custom_checkpoint_*.pkl",
    "runs/*",
    "*/runs/*",
    "*events.out.tfevents*",
)


class PushError(ValueError):
    """The run directory is not ready to share (no card, no token, bad repository id)."""


@dataclass
class PushReport:
    """``files``: what was (or, in a dry run, would be) uploaded; ``commit_url``: None in a dry run."""

    files: list[str]
    commit_url: str | None = None


def ignore_patterns(include_checkpoints: bool = False) -> list[str]:
    """The patterns ``upload_folder`` is given (a new list: huggingface_hub extends it in place)."""
    return [] if include_checkpoints else list(CHECKPOINT_PATTERNS)


def select_files(run_dir: str | Path, include_checkpoints: bool = False) -> list[str]:
    """Paths (relative, '/'-separated, sorted) that :func:`push` uploads from ``run_dir``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PushError(f"run directory {run_dir} does not exist")
    # Listed and filtered as upload_folder does, its default ignores (.git, .cache/huggingface) included.
    files = [path.relative_to(run_dir).as_posix() for path in sorted(run_dir.glob("**/*")) if path.is_file()]
    return upload_selection(files, ignore_patterns(include_checkpoints))


def check_card(run_dir: Path) -> ModelCard:
    """Refuse a run directory without a model card that has a metadata block huggingface_hub can parse."""
    path = run_dir / CARD_FILE
    hint = f"write one with `sinkhorn-hf card {run_dir}`"
    if not path.is_file():
        raise PushError(f"{run_dir} has no {CARD_FILE} model card; {hint}")
    content = path.read_text(encoding="utf-8")
    if not has_card_metadata(content):
        raise PushError(f"{path} has no metadata block (--- yaml ---) at its top; {hint}")
    try:
        return ModelCard(content)
    except ValueError as error:
        raise PushError(f"{path} has invalid metadata: {error}; {hint}") from None


def push(
    run_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    include_checkpoints: bool = False,
    dry_run: bool = False,
    api: Any = None,
) -> PushReport:
    """Create ``repo_id`` (if needed) and upload :func:`select_files` of ``run_dir``.

    With ``dry_run`` nothing is sent, no token is needed and the card is left as it is. Otherwise the card's
    placeholder repository id is filled in first, and the token comes from where huggingface_hub looks
    (``HF_TOKEN``, ``hf auth login``). ``api`` is an ``HfApi`` (a new one by default).
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    run_dir = Path(run_dir)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise PushError(f"{repo_id!r} is not a valid Hub repository id (like 'user/model-name'): {error}") from None
    files = select_files(run_dir, include_checkpoints)
    check_card(run_dir)
    if dry_run:
        return PushReport(files)
    if api is None:
        from huggingface_hub import HfApi, get_token

        if get_token() is None:
            raise PushError("no Hugging Face token found: run `hf auth login` or set HF_TOKEN")
        api = HfApi()
    card_path = run_dir / CARD_FILE
    card_text = card_path.read_text(encoding="utf-8")
    if REPO_ID_PLACEHOLDER in card_text:
        card_path.write_text(card_text.replace(REPO_ID_PLACEHOLDER, repo_id), encoding="utf-8")
    api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
    commit = api.upload_folder(
        folder_path=run_dir,
        repo_id=repo_id,
        repo_type="model",
        ignore_patterns=ignore_patterns(include_checkpoints),
        commit_message="Upload Sinkhorn model with sinkhorn-hf",
    )
    return PushReport(files, getattr(commit, "commit_url", None) or str(commit))


def card_has_placeholder(run_dir: str | Path) -> bool:
    """Whether the card's "how to load" snippet still waits for the repository id (``push`` fills it in)."""
    path = Path(run_dir) / CARD_FILE
    return path.is_file() and REPO_ID_PLACEHOLDER in path.read_text(encoding="utf-8")
