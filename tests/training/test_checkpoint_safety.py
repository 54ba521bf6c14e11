"""Checkpoints never lose work and never lie: a kill mid-write, damaged or foreign files, other settings,
malicious pickles, two runs at once, a loss that turns non-finite."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import make_trainer

from sinkhorn_hf.compat import reset_accelerate_state
from sinkhorn_hf.training.checkpoints import (
    MANIFEST_FILE,
    TRAINER_STATE_FILE,
    CheckpointError,
    checkpoint_dir,
    list_checkpoints,
    resolve_checkpoint,
)
from sinkhorn_hf.training.output_lock import LOCK_FILE, OutputDirInUseError
from sinkhorn_hf.training.trainer import NonFiniteLossError

REPO = Path(__file__).resolve().parents[2]
SHORT = dict(num_train_epochs=1, max_train_steps=3, checkpointing_steps="1", save_total_limit=None)

# Runs run_glue's main with Accelerator.save_state stopping (a file tells when) once it has written the files of
# checkpoint step_5, before the trainer finishes that checkpoint: the parent kills it there with SIGKILL.
KILLED_CHILD = """
import os, signal, sys
from pathlib import Path
import accelerate
from sinkhorn_hf.training.run import main
from sinkhorn_hf.training.tasks.glue import GLUE

ready, argv = Path(sys.argv[1]), sys.argv[2:]
save_state = accelerate.Accelerator.save_state

def save_state_then_stop(self, output_dir=None, **kwargs):
    result = save_state(self, output_dir, **kwargs)
    if Path(output_dir).name.endswith("step_5"):
        ready.write_text(str(os.getpid()))
        signal.pause()
    return result

accelerate.Accelerator.save_state = save_state_then_stop
main(GLUE, argv)
"""


def glue_flags(tiny_bert, files, out, *extra):
    return [
        "--model_name_or_path", str(tiny_bert), "--task_name", "sst2", "--train_file", str(files[0]),
        "--validation_file", str(files[1]), "--output_dir", str(out), "--max_train_steps", "7",
        "--checkpointing_steps", "1", "--learning_rate", "3e-3", "--logging_steps", "1", *extra,
    ]  # fmt: skip


def wait_for(path: Path, process: subprocess.Popen, seconds: float = 600) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the child never reached the checkpoint"
        time.sleep(0.05)


def rewrite_manifest(checkpoint: Path) -> None:
    """What someone handing over a checkpoint can do: make the manifest match whatever the folder holds."""
    files = {
        str(p.relative_to(checkpoint)): {
            "bytes": len(p.read_bytes()),
            "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
        }
        for p in checkpoint.rglob("*")
        if p.is_file() and p.name != MANIFEST_FILE
    }
    (checkpoint / MANIFEST_FILE).write_text(json.dumps({"files": files}))


@pytest.mark.slow
def test_kill_while_writing_a_checkpoint_resumes_from_the_last_complete_one(tiny_bert, sst2_files, tmp_path):
    from sinkhorn_hf.training.run import main
    from sinkhorn_hf.training.tasks.glue import GLUE

    killed, full = tmp_path / "killed", tmp_path / "full"
    child = tmp_path / "child.py"
    child.write_text(KILLED_CHILD)
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, str(child), str(ready), *glue_flags(tiny_bert, sst2_files, killed)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(ready, process)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    root = killed / "checkpoints"
    assert not (root / "step_5").exists()
    assert (root / ".partial-step_5" / "model.safetensors").is_file()  # written, not finished
    assert [p.name for p in list_checkpoints(killed)] == ["step_3", "step_4"]  # --save_total_limit 2
    foreign = root / "step_9"  # e.g. a half-written folder of an older version: skipped, never deleted
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not ours")

    with pytest.warns(RuntimeWarning, match=r"skips incomplete checkpoint folder\(s\) step_9, .partial-step_5 and "
                      r"resumes from step_4"):  # fmt: skip
        resumed = main(GLUE, glue_flags(tiny_bert, sst2_files, killed, "--resume_from_checkpoint", "latest"))
    assert not (root / ".partial-step_5").exists()  # our leftover, cleaned
    assert (foreign / "notes.txt").read_text() == "not ours"
    assert [p.name for p in list_checkpoints(killed)] == ["step_6", "step_7"]

    uninterrupted = main(GLUE, glue_flags(tiny_bert, sst2_files, full))
    assert resumed.train_steps == uninterrupted.train_steps == 7
    assert resumed.eval_history == uninterrupted.eval_history
    weights, reference = load_file(killed / "model.safetensors"), load_file(full / "model.safetensors")
    for name, value in reference.items():
        assert torch.equal(weights[name], value), name


def test_latest_names_what_it_skips_and_a_foreign_folder_is_never_overwritten(tmp_path):
    from sinkhorn_hf.training.checkpoints import finish_checkpoint, partial_dir

    def write(step: int) -> Path:
        final = checkpoint_dir(tmp_path, step)
        partial_dir(final).mkdir(parents=True)
        (partial_dir(final) / "model.safetensors").write_bytes(b"w" * step)
        finish_checkpoint(partial_dir(final), final)
        return final

    write(2)
    newest = write(4)
    write(4)  # the same step again replaces our own complete checkpoint
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_2", "step_4"]
    checkpoint_dir(tmp_path, 6).mkdir()
    with pytest.warns(RuntimeWarning, match="skips incomplete checkpoint folder\\(s\\) step_6 and resumes from step_4"):
        assert resolve_checkpoint("latest", tmp_path) == newest
    with pytest.raises(CheckpointError, match="step_6 is not a complete checkpoint: it has no checkpoint_manifest"):
        from sinkhorn_hf.training.checkpoints import verify_checkpoint

        verify_checkpoint(checkpoint_dir(tmp_path, 6))
    (checkpoint_dir(tmp_path, 6) / "mine.txt").write_text("user file")
    partial_dir(checkpoint_dir(tmp_path, 6)).mkdir()
    with pytest.raises(CheckpointError, match="a folder of that name exists and is not a complete checkpoint"):
        finish_checkpoint(partial_dir(checkpoint_dir(tmp_path, 6)), checkpoint_dir(tmp_path, 6))
    assert (checkpoint_dir(tmp_path, 6) / "mine.txt").read_text() == "user file"


def trained(tiny_bert, sst2_files, out: Path, **overrides) -> Path:
    make_trainer(tiny_bert, sst2_files, out, **{**SHORT, **overrides}).train()
    return checkpoint_dir(out, 2)


def resume(tiny_bert, sst2_files, out: Path, checkpoint: Path, **overrides):
    trainer = make_trainer(tiny_bert, sst2_files, out, resume_from_checkpoint=str(checkpoint), **{**SHORT, **overrides})
    return trainer.train()


def test_garbage_in_the_weights_is_refused_naming_the_file(tiny_bert, sst2_files, tmp_path):
    checkpoint = trained(tiny_bert, sst2_files, tmp_path)
    weights = checkpoint / "model.safetensors"
    header = 8 + int.from_bytes(weights.read_bytes()[:8], "little")
    with weights.open("r+b") as file:  # 4 KiB of 0x7f bytes inside the tensor data: float32 3.4e38
        file.seek(header + 1024)
        file.write(b"\x7f" * 4096)
    with pytest.raises(CheckpointError, match=r"step_2 is damaged: the content of model.safetensors differs"):
        resume(tiny_bert, sst2_files, tmp_path, checkpoint)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:100]),
         r"model.safetensors has 100 bytes, it was written with \d+ \(truncated"),
        (lambda c: (c / "optimizer.bin").write_bytes(b""), r"optimizer.bin has 0 bytes"),
        (lambda c: (c / "random_states_0.pkl").unlink(), "random_states_0.pkl is missing"),
        (lambda c: (c / TRAINER_STATE_FILE).unlink(), "trainer_state.json is missing"),
        (lambda c: (c / MANIFEST_FILE).unlink(), "step_2 is not a complete checkpoint: it has no checkpoint_manifest"),
    ],
    ids=["truncated-weights", "empty-optimizer", "missing-rng", "missing-state", "missing-manifest"],
)  # fmt: skip
def test_truncated_or_missing_files_name_the_checkpoint_and_file(tiny_bert, sst2_files, tmp_path, damage, message):
    checkpoint = trained(tiny_bert, sst2_files, tmp_path)
    damage(checkpoint)
    with pytest.raises(CheckpointError, match=message):
        resume(tiny_bert, sst2_files, tmp_path, checkpoint)


def test_a_damaged_file_with_a_matching_manifest_still_fails_clearly(tiny_bert, sst2_files, tmp_path):
    checkpoint = trained(tiny_bert, sst2_files, tmp_path)
    (checkpoint / "model.safetensors").write_bytes(b"\x00" * 16)
    rewrite_manifest(checkpoint)
    with pytest.raises(CheckpointError, match=r"cannot load checkpoint .*step_2: SafetensorError"):
        resume(tiny_bert, sst2_files, tmp_path, checkpoint)


def test_resume_refuses_changed_settings_listing_every_difference(tiny_bert, sst2_files, tmp_path):
    checkpoint = trained(tiny_bert, sst2_files, tmp_path)
    with pytest.raises(CheckpointError) as refused:
        resume(tiny_bert, sst2_files, tmp_path, checkpoint, learning_rate=1e-4, attn="sdpa")
    message = str(refused.value)
    assert "learning_rate (checkpoint 0.003, now 0.0001)" in message
    assert "model.attn_implementation (checkpoint 'sinkhorn', now 'sdpa')" in message
    for changed in (dict(model_settings={"sinkhorn_iterations": "5"}), dict(model_settings={"adjoint": "checkpoint"}),
                    dict(model_settings={"lora_r": 2}), dict(seed=8), dict(lr_scheduler_type="cosine"),
                    dict(mixed_precision="bf16")):  # fmt: skip
        reset_accelerate_state()  # one Accelerator per process, as in a real run
        with pytest.raises(CheckpointError, match="differs in"):
            resume(tiny_bert, sst2_files, tmp_path, checkpoint, **changed)


class WritesAFile:
    """A pickle that creates ``path`` when it is loaded (stands for any code a crafted pickle runs)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_trainer_state_is_json_and_no_pickle_in_a_checkpoint_runs_code(tiny_bert, sst2_files, tmp_path):
    checkpoint = trained(tiny_bert, sst2_files, tmp_path)
    assert json.loads((checkpoint / TRAINER_STATE_FILE).read_text())["completed_steps"] == 2
    assert not list(checkpoint.glob("custom_checkpoint_*"))
    marker = tmp_path / "code_ran"
    torch.save(WritesAFile(marker), checkpoint / "custom_checkpoint_0.pkl")  # accelerate's pickled custom slot
    rewrite_manifest(checkpoint)
    with pytest.raises(CheckpointError, match="holds custom_checkpoint_0.pkl: accelerate's pickled custom state"):
        resume(tiny_bert, sst2_files, tmp_path, checkpoint)
    assert not marker.exists()
    (checkpoint / "custom_checkpoint_0.pkl").unlink()
    # The RNG states are read with weights_only=True: a crafted one is refused, not run (nor silently skipped).
    torch.save({"random_state": WritesAFile(marker)}, checkpoint / "random_states_0.pkl")
    rewrite_manifest(checkpoint)
    with pytest.raises(CheckpointError, match="cannot read random_states_0.pkl"):
        resume(tiny_bert, sst2_files, tmp_path, checkpoint)
    assert not marker.exists()


HOLD_LOCK = """
import fcntl, os, sys
handle = open(sys.argv[1], "w")
fcntl.flock(handle, fcntl.LOCK_EX)
handle.write(f"{os.getpid()}\\n"); handle.flush()
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_second_run_into_a_locked_output_dir_refuses_with_the_holders_pid(tiny_bert, sst2_files, tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path / LOCK_FILE)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirInUseError, match=rf"is in use by another run \(pid {holder.pid}, lock"):
            make_trainer(tiny_bert, sst2_files, tmp_path, **SHORT).train()
        assert not (tmp_path / "checkpoints").exists()
    finally:
        holder.communicate("")
    assert make_trainer(tiny_bert, sst2_files, tmp_path, **SHORT).train().train_steps == 3  # free again


class NaNAfter:
    """A forward hook on the classifier that makes the logits NaN from the n-th training call on."""

    def __init__(self, calls: int) -> None:
        self.calls = calls

    def __call__(self, module, args, output):
        if module.training:
            self.calls -= 1
            if self.calls < 0:
                return output * float("nan")
        return output


def test_a_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tiny_bert, sst2_files, tmp_path):
    trainer = make_trainer(tiny_bert, sst2_files, tmp_path, num_train_epochs=1, checkpointing_steps="2")
    trainer.model.classifier.register_forward_hook(NaNAfter(4))  # steps 1-4 are fine, step 5 is NaN
    stopped = r"not finite \(inf/NaN\) at step 5 .*the last good checkpoint is .*step_4"
    with pytest.raises(NonFiniteLossError, match=stopped):
        trainer.train()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_2", "step_4"]
    assert not (tmp_path / "model.safetensors").exists()
    weights = load_file(checkpoint_dir(tmp_path, 4) / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())
