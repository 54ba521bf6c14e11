"""Share a run directory on the Hugging Face Hub: the model, its tokenizer, results and card, nothing else.

What is sent is an allowlist of the files a model repository holds (plus what the user names with ``include``),
never a link that leads out of the folder. ``upload_folder`` is given exactly the selected files as its
``allow_patterns``, so a dry run lists exactly what an upload sends, and says what it left out and why.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard

from ..compat import has_card_metadata, upload_selection
from ..training.results import RESULTS_FILE
from .card import CARD_FILE, REPO_ID_PLACEHOLDER
from .convert import CONFIG_NAME, CONVERSION_RECORD, PREPROCESSOR_PATTERNS

# What a model repository holds, by file name, at the top of the run directory or in ADAPTER_FOLDER (a LoRA
# run's adapter): weights and their shard indexes, configs, tokenizer/processor files, card and records.
MODEL_REPO_FILES = (
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model*.bin.index.json",
    "adapter_model.bin",
    "adapter_config.json",
    CONFIG_NAME,
    "generation_config.json",
    "image_processor_config.json",
    *PREPROCESSOR_PATTERNS,
    "chat_template.jinja",
    "chat_template.json",
    CARD_FILE,
    RESULTS_FILE,
    CONVERSION_RECORD,
)
ADAPTER_FOLDER = "adapter"  # sinkhorn_hf.training.trainer.ADAPTER_DIR (not imported: it pulls in accelerate)
# Training state that is not the model, sent only with include_checkpoints: accelerate save_state folders and
# files (checkpoints/checkpoint_N, optimizer.bin, scheduler.bin, sampler.bin, scaler.pt, random_states_N.pkl,
# custom_checkpoint_N.pkl), transformers Trainer folders and files (checkpoint-N, rng_state.pth,
# trainer_state.json, training_args.bin) and tensorboard logs. fnmatch's * also matches "/".
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
    "*rng_state*.pth",
    "*trainer_state.json",
    "*training_args.bin",
    "runs/*",
    "*/runs/*",
    "*events.out.tfevents*",
)
LINK_OUT = "link out of the folder"


class PushError(ValueError):
    """The run directory is not ready to share (no card, no token, bad repository id)."""


@dataclass(frozen=True)
class LeftOut:
    """A path of the run directory that is not sent, and why (``reason`` says how to send it, where one may)."""

    path: str
    reason: str
    link_target: str | None = None  # what a symbolic link points to, as written in the link

    def __str__(self) -> str:
        link = f" -> {self.link_target}" if self.link_target is not None else ""
        return f"{self.path}{link} ({self.reason})"


@dataclass
class Selection:
    """``files``: relative '/'-separated paths that are sent, sorted; ``left_out``: everything else found."""

    files: list[str]
    left_out: list[LeftOut] = field(default_factory=list)


@dataclass
class PushReport:
    """``files``: what was (or, in a dry run, would be) uploaded; ``commit_url``: None in a dry run."""

    files: list[str]
    commit_url: str | None = None
    left_out: list[LeftOut] = field(default_factory=list)


def is_model_repo_file(path: str) -> bool:
    """Whether ``path`` (relative, '/'-separated) is one of :data:`MODEL_REPO_FILES` where a model repo has it."""
    folder, _, name = path.rpartition("/")
    return folder in ("", ADAPTER_FOLDER) and any(fnmatch.fnmatchcase(name, pattern) for pattern in MODEL_REPO_FILES)


def select(run_dir: str | Path, include_checkpoints: bool = False, include: Sequence[str] = ()) -> Selection:
    """What :func:`push` sends from ``run_dir`` and what it leaves out.

    Sent: :func:`is_model_repo_file` files, training state with ``include_checkpoints``, and paths matching an
    ``include`` pattern (``upload_folder``'s ``allow_patterns`` syntax). Never sent: links that lead out of the
    folder (whatever ``include`` says), links to folders (not followed), what ``upload_folder`` always ignores
    (.git, .cache/huggingface). A link inside the folder is sent when both it and its target would be."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PushError(f"run directory {run_dir} does not exist")
    root = run_dir.resolve()
    selection = Selection([])
    for folder, dirs, names in os.walk(run_dir):  # followlinks=False: a linked folder is listed, not entered
        for name in sorted(dirs + names):
            path = Path(folder) / name
            rel = path.relative_to(run_dir).as_posix()
            if path.is_symlink():
                reason = _link_reason(path, rel, root, include_checkpoints, include)
            elif path.is_dir():
                continue
            elif not path.is_file():
                reason = "not a regular file"
            else:
                reason = _file_reason(rel, include_checkpoints, include)
            if reason is None:
                selection.files.append(rel)
            else:
                selection.left_out.append(LeftOut(rel, reason, os.readlink(path) if path.is_symlink() else None))
    selection.files.sort()
    selection.left_out.sort(key=lambda item: item.path)
    return selection


def select_files(run_dir: str | Path, include_checkpoints: bool = False, include: Sequence[str] = ()) -> list[str]:
    """Paths (relative, '/'-separated, sorted) that :func:`push` uploads from ``run_dir`` (:func:`select`)."""
    return select(run_dir, include_checkpoints, include).files


def _file_reason(rel: str, include_checkpoints: bool, include: Sequence[str]) -> str | None:
    """Why the regular file ``rel`` is left out, or None when it is sent."""
    if not upload_selection([rel]):
        return "never uploaded: git and huggingface_hub cache files"
    if include and upload_selection([rel], allow_patterns=list(include)):
        return None
    if any(fnmatch.fnmatchcase(rel, pattern) for pattern in CHECKPOINT_PATTERNS):
        return None if include_checkpoints else "training state; add --include-checkpoints to send it"
    if is_model_repo_file(rel):
        return None
    pattern = shlex.quote(glob.escape(rel))  # quoted as a shell needs it, and always visibly
    pattern = pattern if pattern.startswith("'") else f"'{pattern}'"
    return f"not a model-repo file; add --include {pattern} to send it"


def _link_reason(path: Path, rel: str, root: Path, include_checkpoints: bool, include: Sequence[str]) -> str | None:
    """Why the link ``rel`` is left out, or None when it is sent (it and its target inside the folder are)."""
    target = path.resolve()
    if not target.is_relative_to(root):
        return LINK_OUT
    if not target.exists():
        return "broken link"
    if target.is_dir():
        return "link to a folder; links to folders are not followed"
    target_rel = target.relative_to(root).as_posix()
    for name in (rel, target_rel):
        reason = _file_reason(name, include_checkpoints, include)
        if reason is not None:
            return reason if name == rel else f"link to {target_rel}, which is not sent: {reason}"
    return None


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
    include: Sequence[str] = (),
    dry_run: bool = False,
    api: Any = None,
) -> PushReport:
    """Create ``repo_id`` (if needed) and upload :func:`select` of ``run_dir`` (``include`` as there).

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
    selection = select(run_dir, include_checkpoints, include)
    check_card(run_dir)
    if dry_run:
        return PushReport(selection.files, left_out=selection.left_out)
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
        # The selected files by name, escaped so that none is read as a pattern: exactly what the dry run lists.
        allow_patterns=[glob.escape(name) for name in selection.files],
        commit_message="Upload Sinkhorn model with sinkhorn-hf",
    )
    return PushReport(selection.files, getattr(commit, "commit_url", None) or str(commit), selection.left_out)


def card_has_placeholder(run_dir: str | Path) -> bool:
    """Whether the card's "how to load" snippet still waits for the repository id (``push`` fills it in)."""
    path = Path(run_dir) / CARD_FILE
    return path.is_file() and REPO_ID_PLACEHOLDER in path.read_text(encoding="utf-8")
