"""scripts/reproduce_adjoint_training.py end to end on a tiny synthetic MNIST: both arms in results.json and the
PNG, exact checkpointing trains the same model as exact backprop, a killed grid resumes without redoing runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture
def script(load_script, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the runs' own processes
    return load_script("reproduce_adjoint_training")


@pytest.fixture
def mnist_npz(tiny_mnist) -> Path:
    return tiny_mnist(200, 50)  # 2 training steps of 100


def tiny_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data", str(data), "--depths", "2", "--schemes", "off", "checkpoint", "--seeds", "0", "--hidden", "8",
        "--heads", "2", "--patch-size", "14", "--device", "cpu", "--out", str(out), *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_end_to_end_both_arms_then_resume(script, mnist_npz, tmp_path, monkeypatch, capsys):
    out = tmp_path / "grid"
    assert script.main(tiny_args(mnist_npz, out)) == 0
    results = json.loads((out / "results.json").read_text())
    runs = {run["scheme"]: run for run in results["runs"]}
    assert set(runs) == {"off", "checkpoint"}
    assert [(row["depth"], row["scheme"], row["seeds"]) for row in results["summary"]] == [
        (2, "off", 1),
        (2, "checkpoint", 1),
    ]
    for run in runs.values():
        assert run["steps"] == 2 and run["finite"] and 0 <= run["test_accuracy"] <= 100
        assert run["peak_activation_bytes"] is not None and run["step_seconds"] > 0
    # checkpointing recomputes exactly: the same seed trains the same model as plain backprop
    assert runs["checkpoint"]["final_train_loss"] == pytest.approx(runs["off"]["final_train_loss"], rel=1e-5)
    assert runs["checkpoint"]["test_accuracy"] == runs["off"]["test_accuracy"]
    assert runs["checkpoint"]["anchors"] == [0, 1] and runs["off"]["anchors"] == []
    assert (out / "accuracy_vs_depth.png").stat().st_size > 10_000
    table = capsys.readouterr().out
    assert "| 2 | off | 1 |" in table and "| 2 | checkpoint | 1 |" in table

    # a killed grid: one run's record is lost; the rerun trains that one only, the finished one is kept as it was
    kept = (out / "runs" / "L2_off_seed0.json").read_text()
    (out / "runs" / "L2_checkpoint_seed0.json").unlink()
    trained = []
    original = script.run_in_subprocess
    monkeypatch.setattr(script, "run_in_subprocess", lambda run, *a: trained.append(run) or original(run, *a))
    assert script.main(tiny_args(mnist_npz, out)) == 0
    assert [run["scheme"] for run in trained] == ["checkpoint"]
    assert (out / "runs" / "L2_off_seed0.json").read_text() == kept
    assert len(json.loads((out / "results.json").read_text())["runs"]) == 2
    assert not list(out.rglob("*.tmp*"))

    with pytest.raises(SystemExit, match="other settings.*epochs: 1 there, 2 now"):
        script.main(tiny_args(mnist_npz, out, "--epochs", "2"))


def test_bad_flags_are_refused(script, mnist_npz, tmp_path):
    with pytest.raises(SystemExit):
        script.main(tiny_args(mnist_npz, tmp_path, "--hidden", "9"))  # not a multiple of heads
    with pytest.raises(SystemExit, match="memory is measured on the second"):
        script.main(tiny_args(mnist_npz, tmp_path, "--max-train-samples", "50"))
    with pytest.raises(SystemExit, match="must divide the image size"):
        script.main(tiny_args(mnist_npz, tmp_path, "--patch-size", "5"))
