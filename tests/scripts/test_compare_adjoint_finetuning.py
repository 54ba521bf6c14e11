"""scripts/compare_adjoint_finetuning.py: each arm's run_glue.py flags, the summary's statistics over seeds against
``statistics`` by hand, resuming from the records on disk, and bad arguments refused."""

from __future__ import annotations

import json
import statistics

import pytest


@pytest.fixture
def arms(load_script):
    return load_script("compare_adjoint_finetuning")


def record(arm, seed, accuracy, rss=1000.0, runtime=60.0):
    return {"arm": arm, "seed": seed, "accuracy": accuracy, "train_loss": 0.4, "train_runtime_s": runtime,
            "train_steps": 30, "peak_rss_mb": rss}  # fmt: skip


def test_each_arm_runs_run_glue_with_its_own_flags_and_the_shared_settings(arms, tmp_path):
    args = arms.parse(["--model", "m", "--data", "d", "--task", "rte", "--seeds", "7"])
    command = arms.run_command(args, "reversible-0.1", 7, tmp_path)
    assert command[1].endswith("run_glue.py")

    def value(flag):
        return command[command.index(flag) + 1]

    assert value("--adjoint") == "reversible" and value("--adjoint_coupling") == "0.1"
    assert value("--seed") == "7" and value("--task_name") == "rte" and value("--train_file").endswith("d/train.tsv")
    assert "--overwrite_output_dir" in command  # a run killed half-way is started again, its files moved aside
    assert "--adjoint" not in arms.run_command(args, "full", 7, tmp_path)
    lora = arms.run_command(args, "lora", 7, tmp_path)
    assert lora[-2:] == ["--lora_r", "8"]
    assert lora[lora.index("--learning_rate") + 1] == "0.001"  # adapters train at LoRA's usual, larger rate
    assert command[command.index("--learning_rate") + 1] == "0.0001"


def test_summary_gives_mean_spread_and_difference_to_full(arms):
    runs = [record("full", 1, 0.80), record("full", 2, 0.84), record("reversible-0.1", 1, 0.79, rss=700.0),
            record("reversible-0.1", 2, 0.83, rss=900.0, runtime=90.0), record("lora", 1, 0.70)]  # fmt: skip
    summary = {row["arm"]: row for row in arms.summarise(runs)}
    assert list(summary) == ["full", "lora", "reversible-0.1"]  # the arms' order, not the runs'
    reversible = summary["reversible-0.1"]
    assert reversible["accuracy_mean"] == pytest.approx(81.0)
    assert reversible["accuracy_std"] == pytest.approx(statistics.stdev([79.0, 83.0]))
    assert reversible["vs_full"] == pytest.approx(81.0 - 82.0)
    assert reversible["peak_rss_mb"] == pytest.approx(800.0) and reversible["step_s"] == pytest.approx(2.5)
    assert summary["lora"]["accuracy_std"] is None  # one seed: no spread claimed
    table = arms.render(arms.summarise(runs))
    assert "| reversible-0.1 | 1, 2 | 81.00 ± 2.83 | -1.00 | 800 | 2.50 |" in table
    assert "| full | 1, 2 | 82.00 ± 2.83 | — |" in table


def test_finished_runs_are_read_back_from_disk_so_a_killed_grid_resumes(arms, tmp_path):
    for arm, seed in (("momentum", 3), ("full", 3), ("full", 1)):
        folder = tmp_path / arm / f"seed_{seed}"
        folder.mkdir(parents=True)
        (folder / "record.json").write_text(json.dumps(record(arm, seed, 0.5)))
    (tmp_path / "auto" / "seed_1").mkdir(parents=True)  # a run killed before its record: not finished
    assert [(r["arm"], r["seed"]) for r in arms.finished_runs(tmp_path)] == [("full", 1), ("full", 3), ("momentum", 3)]


def test_bad_arguments_are_refused(arms, capsys):
    with pytest.raises(SystemExit):
        arms.parse(["--model", "m", "--data", "d", "--max_train_samples", "0"])
    assert "--max_train_samples must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        arms.parse(["--model", "m", "--data", "d", "--arms", "euler"])


FAKE_RUN_GLUE = """
import json, sys
from pathlib import Path
out = Path(sys.argv[sys.argv.index("--output_dir") + 1])
results = {"metrics": {"accuracy": 0.75}, "train_loss": 0.5, "train_runtime_s": 6.0, "train_steps": 3}
(out / "results.json").write_text(json.dumps(results))
"""


def test_a_record_interrupted_while_written_leaves_none_so_the_run_is_done_again(arms, tmp_path, monkeypatch):
    """The record marks a run finished: a kill while it is written must not leave half of one, which would break
    every later resume of the grid (the run is simply done again)."""
    fake = tmp_path / "run_glue.py"
    fake.write_text(FAKE_RUN_GLUE)
    monkeypatch.setattr(arms, "RUN_GLUE", fake)
    args = arms.parse(["--model", "m", "--data", "d", "--out", str(tmp_path / "out")])

    def killed_half_way(self, text, *a, **k):
        with open(self, "w") as file:
            file.write(text[: len(text) // 2])
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(arms.Path, "write_text", killed_half_way)
        patch.setattr(arms.os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            arms.run_one(args, "full", 42)
    task_dir = tmp_path / "out" / "sst2"
    assert arms.finished_runs(task_dir) == []  # no record, not half of one
    assert list((task_dir / "full" / "seed_42").glob(".*.tmp")) == []
    record = arms.run_one(args, "full", 42)
    assert arms.finished_runs(task_dir) == [record] and record["accuracy"] == 0.75 and record["peak_rss_mb"] > 0
