"""Where checkpoints live, how they are written so that a kill never leaves a half-written one, and how they are
checked before a resume.

A checkpoint is ``<output_dir>/checkpoints/step_<N>``: ``Accelerator.save_state``'s files (model, optimizer,
scheduler, RNG states) plus :data:`TRAINER_STATE_FILE` (:class:`TrainerState` as JSON: a checkpoint from someone
else cannot run code through it) and, written last, :data:`MANIFEST_FILE`, the sha256 and size of every other file.
It is written into ``.partial-step_<N>`` and renamed into place once the manifest is there, so a folder
``step_<N>`` with a manifest is complete; a resume checks every file against the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "checkpoint_manifest.json"  # written last: its presence marks a complete checkpoint
_STEP_DIR = re.compile(r"^step_(\d+)$")
_PARTIAL_PREFIX = ".partial-"
_PARTIAL_DIR = re.compile(r"^\.partial-(old-)?step_\d+$")  # only folders of this name are ours to clean up


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, corrupted, or was written by a different run."""


@dataclass
class TrainerState:
    """The loop position and bookkeeping needed to continue a run exactly where it stopped.

    ``epoch``/``batch_in_epoch`` locate the next batch to read; ``fingerprint`` holds the settings a
    resumed run must share with the run that wrote the checkpoint; ``adjoint_auto_choices`` what
    ``--adjoint auto`` chose (:func:`sinkhorn_hf.adjoint.auto_choices`), so that a resumed run does not probe again.
    """

    completed_steps: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    train_runtime_s: float = 0.0
    samples_seen: int = 0
    best_metric: float | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False
    last_eval_step: int | None = None
    last_checkpoint_step: int | None = None
    train_loss: float | None = None  # the last logged mean training loss
    history: list[dict[str, Any]] = field(default_factory=list)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    adjoint_auto_choices: dict[str, Any] = field(default_factory=dict)

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> TrainerState:
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"cannot read the trainer state {path}: {error}") from None
        known = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or not set(data) <= known:
            unknown = sorted(set(data) - known) if isinstance(data, dict) else type(data).__name__
            raise CheckpointError(f"{path} is not a trainer state of this version (unexpected: {unknown})")
        return cls(**data)


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIR / f"step_{step}"


def partial_dir(final: Path) -> Path:
    """Where the checkpoint ``final`` is written before it is complete."""
    return final.with_name(_PARTIAL_PREFIX + final.name)


def is_complete(path: Path) -> bool:
    return (path / MANIFEST_FILE).is_file()


def _step_dirs(output_dir: str | Path) -> list[Path]:
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders under ``output_dir``, oldest (lowest step) first."""
    return [p for p in _step_dirs(output_dir) if is_complete(p)]


def partial_checkpoints(output_dir: str | Path) -> list[Path]:
    """Folders left by checkpoints whose writing was interrupted (ours by their name)."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    return sorted(p for p in root.iterdir() if p.is_dir() and _PARTIAL_DIR.match(p.name)) if root.is_dir() else []


def remove_partial_checkpoints(output_dir: str | Path) -> None:
    for path in partial_checkpoints(output_dir):
        shutil.rmtree(path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


def finish_checkpoint(partial: Path, final: Path) -> None:
    """Write ``partial``'s manifest, then rename it to ``final`` (replacing an earlier complete checkpoint of the
    same step; anything else there is not ours and is refused)."""
    if final.exists() and not is_complete(final):
        raise CheckpointError(
            f"cannot write checkpoint {final}: a folder of that name exists and is not a complete checkpoint "
            "(no manifest); it was not written by this program, so it is left alone: move it away or choose "
            "another --output_dir"
        )
    manifest = {
        "files": {
            name: {"bytes": (partial / name).stat().st_size, "sha256": _sha256(partial / name)}
            for name in _files(partial)
        }
    }
    with (partial / MANIFEST_FILE).open("w") as file:
        file.write(json.dumps(manifest, indent=2) + "\n")
        file.flush()
        os.fsync(file.fileno())
    aside = final.with_name(f"{_PARTIAL_PREFIX}old-{final.name}")
    if final.exists():
        os.replace(final, aside)
    os.replace(partial, final)
    if aside.exists():
        shutil.rmtree(aside)


def verify_checkpoint(path: Path) -> None:
    """Raise :class:`CheckpointError` naming the checkpoint and the file unless every file the manifest lists is
    there with its size and sha256, and no pickled custom state is there."""
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(
            f"{path} is not a complete checkpoint: it has no {MANIFEST_FILE} (its writing was interrupted, or it "
            "was not written by sinkhorn_hf); resume from a complete one, e.g. --resume_from_checkpoint latest"
        )
    try:
        listed = json.loads(manifest_path.read_text())["files"]
        entries = {name: (int(entry["bytes"]), str(entry["sha256"])) for name, entry in listed.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST_FILE} is unreadable ({error!r})") from None
    pickled = sorted(p.name for p in path.glob("custom_checkpoint_*.pkl"))
    if pickled:
        raise CheckpointError(
            f"checkpoint {path} holds {', '.join(pickled)}: accelerate's pickled custom state, which sinkhorn_hf "
            "never writes and does not load (a pickle can run any code); its trainer state is trainer_state.json"
        )
    for name, (size, sha256) in entries.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is damaged: {name} is missing")
        if file.stat().st_size != size:
            raise CheckpointError(
                f"checkpoint {path} is damaged: {name} has {file.stat().st_size} bytes, it was written with {size} "
                "(truncated or changed)"
            )
        if _sha256(file) != sha256:
            raise CheckpointError(
                f"checkpoint {path} is damaged: the content of {name} differs from what was written (sha256 "
                "mismatch); resume from another checkpoint"
            )


def resolve_checkpoint(spec: str, output_dir: str | Path) -> Path:
    """``"latest"`` -> the newest complete checkpoint under ``output_dir`` (warning about newer incomplete ones it
    skips); anything else must be a checkpoint folder."""
    if spec == "latest":
        found = list_checkpoints(output_dir)
        newest = int(_STEP_DIR.match(found[-1].name).group(1)) if found else -1
        skipped = [p for p in _step_dirs(output_dir) if not is_complete(p)] + partial_checkpoints(output_dir)
        skipped = [p for p in skipped if int(re.search(r"\d+$", p.name).group()) > newest]
        if skipped:
            warnings.warn(
                "--resume_from_checkpoint latest skips incomplete checkpoint folder(s) "
                + ", ".join(p.name for p in skipped)
                + (f" and resumes from {found[-1].name}" if found else ""),
                RuntimeWarning,
                stacklevel=2,
            )
        if not found:
            raise FileNotFoundError(
                f"--resume_from_checkpoint latest: no checkpoint under {Path(output_dir) / CHECKPOINTS_DIR} "
                "(checkpoints are written every --checkpointing_steps and at the end of training)"
            )
        return found[-1]
    path = Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(
            f"--resume_from_checkpoint {spec!r} is not a folder; give a checkpoint folder "
            f"(e.g. {checkpoint_dir(output_dir, 100)}) or 'latest'"
        )
    return path


def prune_checkpoints(output_dir: str | Path, keep: int | None) -> None:
    """Delete the oldest complete checkpoints so that at most ``keep`` remain (None keeps all)."""
    if keep is None:
        return
    found = list_checkpoints(output_dir)
    for path in found[: max(len(found) - keep, 0)]:
        shutil.rmtree(path)
