"""Where checkpoints live, how they are written so that a kill never leaves a half-written one, and how they are
checked before a resume.

A checkpoint is ``<output_dir>/checkpoints/step_<N>``: ``Accelerator.save_state``'s files (model, optimizer,
scheduler, RNG states) plus :data:`TRAINER_STATE_FILE` (:class:`TrainerState` as JSON: a checkpoint from someone
else cannot run code through it) and, written last, :data:`MANIFEST_FILE`, the sha256 and size of every other file.
It is written into ``.partial-step_<N>`` and renamed into place once the manifest is there, so a folder
``step_<N>`` with a manifest is complete; a resume checks every file against the manifest.

A folder holds the checkpoints of one run: a run that does not continue them refuses to write among them
(:func:`check_run_start`) unless asked to move them aside (:func:`move_earlier_run_aside`), and pruning deletes
only checkpoints carrying the run's own ``run_id``. Nothing is deleted that this program did not write: folders in
the way are renamed aside, never removed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
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
PREVIOUS_RUN_PREFIX = "previous_run-"  # where --overwrite_output_dir moves an earlier run's checkpoints
# Besides checkpoints/, what a run writes at the top of --output_dir other than its model (results, tracker logs,
# attention marginals): it describes the earlier run and moves aside with its checkpoints.
_EARLIER_RUN_FILES = ("results.json", "runs", "attention_marginals.json", "attention_marginals.png")


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, corrupted, or was written by a different run."""


class OutputDirHasCheckpointsError(CheckpointError):
    """A new run was asked to write into a folder holding the checkpoints of an earlier run."""


class OutOfSpaceError(OSError):
    """A checkpoint or the final model could not be written: the disk is full."""


@dataclass
class TrainerState:
    """The loop position and bookkeeping needed to continue a run exactly where it stopped.

    ``epoch``/``batch_in_epoch`` locate the next batch to read; ``fingerprint`` holds the settings a
    resumed run must share with the run that wrote the checkpoint; ``adjoint_auto_choices`` what
    ``--adjoint auto`` chose (:func:`sinkhorn_hf.adjoint.auto_choices`), so that a resumed run does not probe again;
    ``run_id`` names the run (kept across resumes): only checkpoints with the same id are ever pruned.
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
    run_id: str = ""  # "" in checkpoints of versions before run ids: never pruned

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


def move_into_place(staging: Path, folder: Path) -> None:
    """Move every entry of ``staging`` (a finished final model) into ``folder``, replacing those of the same name,
    config.json last so that it never stands there without its weights; then remove the emptied ``staging``.
    A sub-folder (LoRA's adapter/) replaces the earlier one by renames, the earlier one deleted only after."""
    for entry in sorted(staging.iterdir(), key=lambda p: p.name == "config.json"):
        target = folder / entry.name
        if entry.is_dir() and target.is_dir():
            earlier = folder / f"{_PARTIAL_PREFIX}old-{entry.name}"
            shutil.rmtree(earlier, ignore_errors=True)  # ours, left by a run killed between these renames
            os.replace(target, earlier)
            os.replace(entry, target)
            shutil.rmtree(earlier)
        else:
            os.replace(entry, target)
    staging.rmdir()


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


def resolve_checkpoint(spec: str, output_dir: str | Path) -> Path | None:
    """``"latest"`` -> the newest complete checkpoint under ``output_dir`` (warning about newer incomplete ones it
    skips), or None when there is none yet (a requeued job's first launch starts from step 0); anything else must
    be a checkpoint folder."""
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
        return found[-1] if found else None
    path = Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(
            f"--resume_from_checkpoint {spec!r} is not a folder; give a checkpoint folder "
            f"(e.g. {checkpoint_dir(output_dir, 100)}) or 'latest'"
        )
    return path


def check_run_start(output_dir: str | Path, resume_from_checkpoint: str | None, overwrite_output_dir: bool) -> None:
    """Refuse (:class:`OutputDirHasCheckpointsError`) a run that would write among the complete checkpoints of an
    earlier run in ``output_dir`` without continuing them: one that resumes nothing, or a checkpoint from elsewhere.
    ``overwrite_output_dir`` lets it start (the trainer then moves them aside). A named checkpoint must exist.
    Reads only, so the scripts call it before loading data and model."""
    if resume_from_checkpoint not in (None, "latest"):
        resolve_checkpoint(resume_from_checkpoint, output_dir)
    found = list_checkpoints(output_dir)
    if not found or overwrite_output_dir or resume_from_checkpoint == "latest":
        return
    root = (Path(output_dir) / CHECKPOINTS_DIR).resolve()
    if resume_from_checkpoint is not None and Path(resume_from_checkpoint).resolve().parent == root:
        return
    instead = f"resuming {resume_from_checkpoint} from elsewhere" if resume_from_checkpoint else "a new run"
    raise OutputDirHasCheckpointsError(
        f"--output_dir {output_dir} holds checkpoints of an earlier run ({', '.join(p.name for p in found)}) and "
        f"{instead} there would mix with them: continue that run with --resume_from_checkpoint latest, start anew "
        f"with --overwrite_output_dir (its checkpoints, results and logs are moved into "
        f"{PREVIOUS_RUN_PREFIX}<time>/ inside it, nothing is deleted), or choose another --output_dir"
    )


def move_earlier_run_aside(output_dir: str | Path) -> Path | None:
    """Move ``checkpoints/`` and the earlier run's results.json, tracker logs (``runs/``) and attention marginals
    into a new ``previous_run-<UTC time>`` folder in ``output_dir``, so that a new run starts among no checkpoints
    and nothing is lost (its final model at the top is replaced by the new run's at the end). Returns that folder
    (None when there was nothing to move)."""
    output_dir = Path(output_dir)
    moving = [output_dir / name for name in (CHECKPOINTS_DIR, *_EARLIER_RUN_FILES) if (output_dir / name).exists()]
    if not moving:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    aside = _free_name(output_dir / f"{PREVIOUS_RUN_PREFIX}{stamp}")
    aside.mkdir()
    for path in moving:
        os.replace(path, aside / path.name)
    return aside


def set_aside_unusable(final: Path, run_id: str) -> Path | None:
    """Before checkpoint ``final`` is written: rename a folder of that name out of the way unless it is this run's
    own complete checkpoint (which the new one replaces). That is an incomplete one ``latest`` skipped, or one
    of another run: ``step_<N>.incomplete`` / ``step_<N>.other-run`` (``-2``, ... if taken). Returns where it went."""
    if not final.exists() or (is_complete(final) and checkpoint_run_id(final) == run_id):
        return None
    aside = _free_name(final.with_name(f"{final.name}.{'other-run' if is_complete(final) else 'incomplete'}"))
    os.replace(final, aside)
    return aside


def _free_name(path: Path) -> Path:
    """``path``, or ``path-2``, ``path-3``, ... the first that does not exist."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def checkpoint_run_id(path: Path) -> str | None:
    """The ``run_id`` in a checkpoint's trainer state (None when unreadable)."""
    try:
        return TrainerState.read(path / TRAINER_STATE_FILE).run_id
    except (CheckpointError, TypeError):
        return None


def prune_checkpoints(output_dir: str | Path, keep: int | None, run_id: str) -> None:
    """Delete the oldest complete checkpoints of run ``run_id`` so that at most ``keep`` of them remain (None keeps
    all). Checkpoints of any other run, or of none (``run_id`` ""), are never touched."""
    if keep is None or not run_id:
        return
    ours = [path for path in list_checkpoints(output_dir) if checkpoint_run_id(path) == run_id]
    for path in ours[: max(len(ours) - keep, 0)]:
        shutil.rmtree(path)


def is_disk_full(error: BaseException, where: str | Path) -> bool:
    """ENOSPC, as an OSError or inside another library's error (safetensors: "No space left on device"); or any
    error while the disk holding ``where`` has under 1 MiB free, as torch.save's do not say why ("unexpected pos")."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(seen) or "StorageFull" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return _free_bytes(where) < 2**20


def space_needed(output_dir: str | Path, keep: int | None) -> str:
    """A sentence on the space checkpoints need: the newest one's size, and ``keep`` + 1 of them at once."""
    found = list_checkpoints(output_dir)
    size = ""
    if found:
        total = sum(p.stat().st_size for p in found[-1].rglob("*") if p.is_file())
        size = f" (the last, {found[-1].name}, takes {total / 2**20:.1f} MiB)"
    if keep is None:
        return f"--save_total_limit is unset, so every checkpoint is kept{size}"
    return (
        f"with --save_total_limit {keep} the disk must hold {keep + 1} checkpoints{size}, as the oldest is "
        "deleted only once the new one is complete"
    )


def free_space(path: str | Path) -> str:
    """Free space on the disk holding ``path``, e.g. ``"12.3 MiB free"``."""
    return f"{_free_bytes(path) / 2**20:.1f} MiB free"


def _free_bytes(path: str | Path) -> int:
    """Bytes free (for this user) on the disk holding ``path`` or its nearest existing parent."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free
