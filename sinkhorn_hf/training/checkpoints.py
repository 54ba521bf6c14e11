"""Where checkpoints live and what the trainer stores beside accelerate's own state.

A checkpoint is ``<output_dir>/checkpoints/step_<N>``, written by ``Accelerator.save_state`` (model,
optimizer, scheduler, RNG states) plus :class:`TrainerState` (loop position, early-stopping record).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CHECKPOINTS_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class TrainerState:
    """The loop position and bookkeeping needed to continue a run exactly where it stopped.

    ``epoch``/``batch_in_epoch`` locate the next batch to read; ``fingerprint`` holds the settings a
    resumed run must share with the run that wrote the checkpoint.
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

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIR / f"step_{step}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoint folders under ``output_dir``, oldest (lowest step) first."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(spec: str, output_dir: str | Path) -> Path:
    """``"latest"`` -> the newest checkpoint under ``output_dir``; anything else must be a checkpoint folder."""
    if spec == "latest":
        found = list_checkpoints(output_dir)
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
    """Delete the oldest checkpoints so that at most ``keep`` remain (None keeps all)."""
    if keep is None:
        return
    found = list_checkpoints(output_dir)
    for path in found[: max(len(found) - keep, 0)]:
        shutil.rmtree(path)
