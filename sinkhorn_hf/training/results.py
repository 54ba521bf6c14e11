"""``results.json``, the one schema: what was run (model, data, attention, command) and what came out (metrics,
final training loss, throughput). The trainer writes it; :mod:`sinkhorn_hf.hub.card` reads it back through
:meth:`RunResults.read`, which checks every field against its type here.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shlex
import sys
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from ..atomic_files import write_json_atomic
from .arguments import ModelArguments, TrainerArguments

RESULTS_FILE = "results.json"


class ResultsError(ValueError):
    """A results file that does not follow :class:`RunResults`."""


@dataclass(kw_only=True)
class RunInfo:
    """The "what was run" half, known before training starts. ``dataset``: a Hub name, or local paths (absolute)."""

    model_name_or_path: str
    command: str
    config_overrides: str | None = None
    task_name: str | None = None
    dataset: str | list[str] | None = None
    attn_implementation: str | None = None
    sinkhorn_iterations: int | None = None
    adjoint: str | bool | dict | None = None
    lora: dict | None = None
    eval_split: str | list[str] | None = None
    eval_subset: bool | None = None  # evaluated on a seeded subset (--max_eval_samples below the split's size)
    seed: int | None = None
    long_text_strategy: str | None = None  # IMDB only
    max_length: int | None = None  # text tasks: tokens per example (per chunk)


@dataclass(kw_only=True)
class RunResults(RunInfo):
    """A whole ``results.json``. ``metrics`` are the last evaluation's (a suffix per further split, e.g.
    ``accuracy_mm``); ``num_eval_samples`` the examples each split evaluated (``num_samples``, ``num_samples_mm``);
    ``train_loss`` is the mean training loss of the last logging window (None when no step ran)."""

    metrics: dict[str, float]
    num_eval_samples: dict[str, int] = field(default_factory=dict)
    num_train_samples: int | None = None
    train_steps: int | None = None
    epochs: float | None = None
    stopped_early: bool | None = None
    train_loss: float | None = None
    train_runtime_s: float | None = None
    train_samples_per_second: float | None = None
    peak_memory_mb: float | None = None
    peak_memory_kind: str | None = None
    num_processes: int | None = None
    mixed_precision: str | None = None
    eval_history: list[dict] = field(default_factory=list)
    attention_marginals: dict | None = None  # --track_attention_marginals: records, and the json / png written

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, output_dir: str | Path) -> Path:
        """Write ``output_dir/results.json`` atomically (a temporary sibling renamed over it)."""
        return write_json_atomic(Path(output_dir) / RESULTS_FILE, self.to_dict())

    @classmethod
    def from_dict(cls, data: Any, where: str = "results") -> RunResults:
        """Check ``data`` against the field types (keys this schema does not know are ignored) and build it.
        Raises :class:`ResultsError` naming the first key that is wrong."""
        if not isinstance(data, dict):
            raise ResultsError(f"{where} must hold a JSON object of run results, got {type(data).__name__}")
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        hints = typing.get_type_hints(cls)
        for name in (f.name for f in fields(cls)):
            if name not in data:
                if name in required:
                    raise ResultsError(
                        f"{where} has no {name!r}; a trainer results file needs at least: {', '.join(required)}"
                    )
                continue
            _check_type(where, name, data[name], hints[name])
        for name, value in data["metrics"].items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ResultsError(f"{where}: metric {name!r} must be a finite number, got {value!r}")
        return cls(**{name: data[name] for name in hints if name in data})

    @classmethod
    def read(cls, path: str | Path) -> RunResults:
        path = Path(path)
        if not path.is_file():
            raise ResultsError(f"results file {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ResultsError(
                f"{path} is not valid JSON: {error.msg} (line {error.lineno}, column {error.colno})"
            ) from None
        return cls.from_dict(data, str(path))


def _check_type(where: str, name: str, value: Any, hint: Any) -> None:
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    plain = [typing.get_origin(option) or option for option in options]
    allowed = (*plain, int) if float in plain else tuple(plain)  # JSON writes 2.0 as 2
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in plain):
        names = " or ".join("null" if option is type(None) else option.__name__ for option in plain)
        raise ResultsError(f"{where}: {name!r} must be {names}, got {value!r}")
    if isinstance(value, list) and list[str] in options and not all(isinstance(item, str) for item in value):
        raise ResultsError(f"{where}: {name!r} must be a string or a list of strings, got {value!r}")


def command_line(argv: list[str] | None = None) -> str:
    """The command that started this process, with the interpreter or ``accelerate launch`` in front."""
    argv = list(sys.argv if argv is None else argv)
    if "ACCELERATE_MIXED_PRECISION" in os.environ:  # set by `accelerate launch` for every process it starts
        launcher = ["accelerate", "launch", "--num_processes", os.environ.get("WORLD_SIZE", "1")]
        if "LOCAL_RANK" in os.environ:  # started by the torch elastic launcher, i.e. --multi_gpu
            launcher.append("--multi_gpu")
        if os.environ.get("ACCELERATE_USE_CPU", "False").lower() in ("1", "true"):
            launcher.append("--cpu")
        if os.environ["ACCELERATE_MIXED_PRECISION"] != "no":
            launcher += ["--mixed_precision", os.environ["ACCELERATE_MIXED_PRECISION"]]
        return shlex.join(launcher + argv)
    return shlex.join([Path(sys.executable).name, *argv])


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak memory of this process in MiB and what was measured (accelerator allocations or host RSS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_memory_allocated"
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "host_max_rss"


def run_info(
    model_args: ModelArguments,
    trainer_args: TrainerArguments,
    *,
    task_name: str,
    dataset: str | list[str],
    eval_split: str | list[str],
    lora_targets: tuple[str, ...] | None = None,
    **task_fields: Any,
) -> RunInfo:
    """The :class:`RunInfo` of a script run; ``task_fields`` are a task's own fields (max_length, eval_subset...)."""
    lora = None
    if model_args.lora_r is not None:
        lora = {
            "r": model_args.lora_r,
            "alpha": model_args.lora_alpha,
            "dropout": model_args.lora_dropout,
            "target_modules": list(lora_targets) if lora_targets is not None else None,
        }
    sinkhorn = model_args.attn_implementation == "sinkhorn"
    return RunInfo(
        model_name_or_path=model_args.model_name_or_path or f"{model_args.model_type} (random init)",
        config_overrides=model_args.config_overrides,
        task_name=task_name,
        dataset=[str(Path(p).resolve()) for p in dataset] if isinstance(dataset, list) else dataset,
        attn_implementation=model_args.attn_implementation,
        sinkhorn_iterations=model_args.sinkhorn_settings.iterations if sinkhorn else None,
        adjoint=model_args.adjoint,
        lora=lora,
        command=command_line(),
        eval_split=eval_split,
        seed=trainer_args.seed,
        **task_fields,
    )
