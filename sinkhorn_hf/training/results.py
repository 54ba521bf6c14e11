"""``results.json``: what was run (model, data, attention, command) and what came out (metrics, throughput).

The model-card helper reads these keys; keep them stable.
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from .arguments import ModelArguments, TrainerArguments

RESULTS_FILE = "results.json"


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


def run_header(
    model_args: ModelArguments,
    trainer_args: TrainerArguments,
    *,
    task_name: str,
    dataset: str | list[str],
    eval_split: str | list[str],
) -> dict[str, Any]:
    """The "what was run" half of results.json, known before training starts. ``dataset`` is a Hub name, or
    a list of local paths (recorded absolute)."""
    lora = None
    if model_args.lora_r is not None:
        lora = {
            "r": model_args.lora_r,
            "alpha": model_args.lora_alpha,
            "dropout": model_args.lora_dropout,
            "target_modules": None,  # filled in by the model builder with the resolved names
        }
    return {
        "model_name_or_path": model_args.model_name_or_path or f"{model_args.model_type} (random init)",
        "config_overrides": model_args.config_overrides,
        "task_name": task_name,
        "dataset": [str(Path(p).resolve()) for p in dataset] if isinstance(dataset, list) else dataset,
        "attn_implementation": model_args.attn_implementation,
        "sinkhorn_iterations": model_args.sinkhorn_iterations if model_args.attn_implementation == "sinkhorn" else None,
        "adjoint": model_args.adjoint,
        "lora": lora,
        "command": command_line(),
        "eval_split": eval_split,
        "seed": trainer_args.seed,
    }


def write_results(output_dir: str | Path, results: dict[str, Any]) -> Path:
    path = Path(output_dir) / RESULTS_FILE
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path
