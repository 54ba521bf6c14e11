"""Two CPU processes under ``accelerate launch`` train and evaluate like one process with the global batch.

accelerate 1.x starts several CPU processes with its torch elastic launcher (``--multi_gpu``, which needs no
GPU); ``--cpu --num_processes N`` starts one process and leaves the rest to mpirun.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import HfArgumentParser

from sinkhorn_hf.training.arguments import ModelArguments, TrainerArguments
from sinkhorn_hf.training.run import run_task
from sinkhorn_hf.training.tasks.glue import GLUE, GlueDataArguments
from sinkhorn_hf.training.trainer import make_accelerator
from sinkhorn_hf.user_errors import UsageError

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "run_glue.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tiny_bert, sst2_files, tmp_path):
    train, dev = sst2_files
    common = [
        "--model_name_or_path", str(tiny_bert), "--task_name", "sst2", "--train_file", str(train),
        "--validation_file", str(dev), "--attn_implementation", "sinkhorn", "--num_train_epochs", "2",
        "--learning_rate", "3e-3", "--per_device_eval_batch_size", "4", "--seed", "3", "--warmup_ratio", "0.25",
        # no dropout: the two processes draw different dropout masks than one process would
        "--config_overrides", "hidden_dropout_prob=0,attention_probs_dropout_prob=0",
    ]  # fmt: skip
    parser = HfArgumentParser((ModelArguments, GlueDataArguments, TrainerArguments))
    single = run_task(
        GLUE,
        *parser.parse_args_into_dataclasses(
            [*common, "--per_device_train_batch_size", "8", "--output_dir", str(tmp_path / "one")]
        ),
    )

    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        *launch,
        str(SCRIPT),
        *common,
        "--per_device_train_batch_size",
        "4",
        "--output_dir",
        str(tmp_path / "two"),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    double = json.loads((tmp_path / "two" / "results.json").read_text())

    assert double["num_processes"] == 2 and single.num_processes == 1
    assert double["command"].startswith("accelerate launch --num_processes 2 --multi_gpu ")
    # every dev row evaluated once (41 rows do not split evenly over 2 processes x batches of 4)
    assert double["num_eval_samples"] == single.num_eval_samples == {"num_samples": 41}
    assert double["train_steps"] == single.train_steps == 24  # 96 rows / global batch 8, 2 epochs
    assert double["metrics"] == single.metrics
    one = load_file(tmp_path / "one" / "model.safetensors")
    two = load_file(tmp_path / "two" / "model.safetensors")
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, rtol=1e-4, atol=1e-5)


def test_a_lone_process_of_a_cpu_launch_refuses_to_train(monkeypatch, tmp_path):
    # what `accelerate launch --cpu --num_processes 2` leaves in the one process it starts
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    with pytest.raises(UsageError, match="--multi_gpu --num_processes N"):  # one line, exit status 2, in a script
        make_accelerator(TrainerArguments(output_dir=str(tmp_path)))
