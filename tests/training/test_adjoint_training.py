"""The trainer and the adjoint: an inexact rebuild stops the run (non-zero exit) unless allowed, auto's choice is
printed once and survives a resume without probing again."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import make_trainer

import sinkhorn_hf.adjoint.attach
from sinkhorn_hf.adjoint import InexactAdjointError
from sinkhorn_hf.compat import reset_accelerate_state
from sinkhorn_hf.training.checkpoints import TRAINER_STATE_FILE, TrainerState, checkpoint_dir, list_checkpoints
from sinkhorn_hf.training.run import main
from sinkhorn_hf.training.tasks.glue import GLUE

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def loud_bert(tiny_bert, tmp_path_factory) -> Path:
    """tiny_bert with its encoder's dense weights ×10: Euler's reverse step rebuilds its layer inputs with relative
    errors of 2.5-8 (tolerance 1e-2); with the init's small weights the rebuild is within 3e-4."""
    from transformers import AutoTokenizer, BertModel

    path = tmp_path_factory.mktemp("loud_bert")
    model = BertModel.from_pretrained(tiny_bert)
    with torch.no_grad():
        for name, param in model.encoder.named_parameters():
            if name.endswith("dense.weight"):
                param.mul_(10.0)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(path)
    return path


def flags(model: Path, files, out: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(model), "--task_name", "sst2", "--train_file", str(files[0]),
        "--validation_file", str(files[1]), "--output_dir", str(out), "--max_train_steps", "2", *extra,
    ]  # fmt: skip


def test_an_inexact_euler_rebuild_stops_the_run(loud_bert, sst2_files, tmp_path):
    with pytest.raises(SystemExit, match=r"'euler' on bert.encoder.layer: the rebuilt inputs of layers") as stop:
        main(GLUE, flags(loud_bert, sst2_files, tmp_path, "--adjoint", "euler"))
    assert stop.value.code == 1 and isinstance(stop.value.__context__, InexactAdjointError)  # one line, exit 1
    assert not (tmp_path / "model.safetensors").exists() and not list_checkpoints(tmp_path)


def test_allow_inexact_trains_on_with_one_warning(loud_bert, sst2_files, tmp_path):
    with pytest.warns(RuntimeWarning, match="Training on \\(allow_inexact=True\\)") as caught:
        result = main(GLUE, flags(loud_bert, sst2_files, tmp_path, "--adjoint", "euler", "--adjoint_allow_inexact"))
    assert len([w for w in caught if "allow_inexact" in str(w.message)]) == 1
    assert result.train_steps == 2


@pytest.mark.slow
def test_run_glue_with_an_inexact_euler_rebuild_exits_nonzero(loud_bert, sst2_files, tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "run_glue.py"), *flags(loud_bert, sst2_files, tmp_path),
         "--adjoint", "euler"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr  # a refusal the user can act on: one line
    assert "run_glue.py: error: adjoint 'euler' on bert.encoder.layer" in done.stderr.splitlines()[-1]
    assert not (tmp_path / "model.safetensors").exists()


def test_auto_choice_is_printed_once_and_restored_on_resume(loud_bert, sst2_files, tmp_path, monkeypatch, capsys):
    probes = []
    choose = sinkhorn_hf.adjoint.attach.choose_anchors

    def counting_choose(*args, **kwargs):
        probes.append(args[0])
        return choose(*args, **kwargs)

    monkeypatch.setattr(sinkhorn_hf.adjoint.attach, "choose_anchors", counting_choose)
    common = dict(attn="sdpa", model_settings={"adjoint": "auto"}, max_train_steps=4, checkpointing_steps="2")
    make_trainer(loud_bert, sst2_files, tmp_path / "full", **common).train()
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("adjoint: ")]
    assert len(printed) == 1 and "auto on bert.encoder.layer" in printed[0] and "anchors at layers" in printed[0]
    assert probes == ["bert.encoder.layer"]  # probed once, at the first step
    full = TrainerState.read(checkpoint_dir(tmp_path / "full", 4) / TRAINER_STATE_FILE).adjoint_auto_choices
    assert full["bert.encoder.layer"]["choice"]["anchors"]  # the rebuild is off: anchors were needed

    probes.clear()
    with pytest.raises(KeyboardInterrupt):
        make_trainer(loud_bert, sst2_files, tmp_path / "killed", crash_after=3, **common).train()
    assert [p.name for p in list_checkpoints(tmp_path / "killed")] == ["step_2"]
    assert probes == ["bert.encoder.layer"]
    probes.clear()
    reset_accelerate_state()
    make_trainer(loud_bert, sst2_files, tmp_path / "killed", resume_from_checkpoint="latest", **common).train()
    assert probes == []  # the resumed run took the stored choice
    resumed = TrainerState.read(checkpoint_dir(tmp_path / "killed", 4) / TRAINER_STATE_FILE).adjoint_auto_choices
    assert resumed == full
    weights = load_file(tmp_path / "killed" / "model.safetensors")
    reference = load_file(tmp_path / "full" / "model.safetensors")
    for name, value in reference.items():
        assert torch.equal(weights[name], value), name
