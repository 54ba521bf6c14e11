"""``sinkhorn-hf demo``: both arms trained through the project's trainer, their results, marginals and plot; the
output folder's safety rules (refuse foreign content, rerun over an earlier demo, a failure keeps the old one)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sinkhorn_hf.attention.diagnostics import marginal_report
from sinkhorn_hf.cli import main
from sinkhorn_hf.commands import demo
from sinkhorn_hf.training.results import RunResults

TINY = ["--num_train_epochs", "1", "--max_train_samples", "64"]  # 2 optimizer steps per arm


def _run(out: Path, *flags: str) -> int:
    return main(["demo", "--output_dir", str(out), *TINY, *flags])


def _accuracies(printed: str) -> dict[str, float]:
    found = re.findall(r"^\s+(SoftMax \(sdpa\)|Sinkhorn K=\d+)\s+([01]\.\d{4})\s+\(trained", printed, re.MULTILINE)
    return {label: float(value) for label, value in found}


def _check_demo_output(out: Path, printed: str, seed: int) -> dict:
    manifest = json.loads((out / demo.MANIFEST).read_text())
    assert manifest["seed"] == seed and set(manifest["arms"]) == {"softmax", "sinkhorn"}
    printed_accuracy = _accuracies(printed)
    assert set(printed_accuracy) == {"SoftMax (sdpa)", "Sinkhorn K=3"}
    for arm, attention, iterations in (("softmax", "sdpa", None), ("sinkhorn", "sinkhorn", 3)):
        results = RunResults.read(out / arm / "results.json")  # the trainer's schema, checked field by field
        assert (results.attn_implementation, results.sinkhorn_iterations, results.seed) == (attention, iterations, seed)
        assert results.dataset == [str((out / demo.DATA_FILE).resolve())] and (out / demo.DATA_FILE).is_file()
        assert results.num_train_samples == 64 and results.num_eval_samples == {"num_samples": 360}
        label = manifest["arms"][arm]["label"]
        assert printed_accuracy[label] == pytest.approx(results.metrics["accuracy"], abs=5e-5)
        assert str(out / arm / "results.json") in printed
    plot = out / demo.PLOT_FILE
    assert plot.read_bytes()[:4] == b"\x89PNG" and plot.stat().st_size > 1000 and str(plot) in printed
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left behind
    return manifest


def test_demo_trains_both_arms_and_reruns_into_its_own_folder(tmp_path, capsys):
    out = tmp_path / "sinkhorn-demo"
    assert _run(out) == 0
    printed = capsys.readouterr().out
    manifest = _check_demo_output(out, printed, seed=0)
    assert "max|row sum-1|" in printed and "std(col sums)" in printed
    softmax, sinkhorn = (manifest["arms"][arm]["marginals"] for arm in ("softmax", "sinkhorn"))
    assert len(softmax) == len(sinkhorn) == 2  # one row per layer
    assert all(row["row_error"] < 1e-5 for row in softmax + sinkhorn)  # SoftMax and odd K: rows exact
    # K=3 balances columns far better than SoftMax on the same test images
    assert all(s["column_error"] < 0.1 * f["column_error"] for s, f in zip(sinkhorn, softmax, strict=True))

    assert _run(out, "--seed", "1") == 0  # an earlier demo output is replaced, not refused
    _check_demo_output(out, capsys.readouterr().out, seed=1)


@pytest.mark.slow
def test_demo_marginals_are_those_of_the_saved_sinkhorn_model(tmp_path, capsys):
    from transformers import AutoModelForImageClassification

    from sinkhorn_hf.training.tasks.images import IMAGES

    out = tmp_path / "out"
    assert _run(out, "--sinkhorn_iterations", "2") == 0  # even K: columns exact, rows measurably not
    assert "Sinkhorn K=2" in capsys.readouterr().out
    model = AutoModelForImageClassification.from_pretrained(out / "sinkhorn", attn_implementation="eager").eval()
    with np.load(out / demo.DATA_FILE) as arrays:
        images, labels = arrays["x_test"][: demo.MARGINAL_BATCH], arrays["y_test"][: demo.MARGINAL_BATCH]
    rows = [{"image": x, "labels": y} for x, y in zip(images, labels, strict=True)]
    pixels = IMAGES.collator(IMAGES.default_processor(model.config), model.config)(rows)["pixel_values"]
    with torch.no_grad():
        softmax = model(pixel_values=pixels, output_attentions=True).attentions  # Sinkhorn step 1 = SoftMax
    # Independent reference: step 2 of K=2 (normalise columns) in float64 on the eager SoftMax weights.
    reference = tuple((w.double().log() - w.double().log().logsumexp(-2, keepdim=True)).exp() for w in softmax)
    expected = marginal_report(reference).summary()
    reported = json.loads((out / demo.MANIFEST).read_text())["arms"]["sinkhorn"]["marginals"]
    for got, want in zip(reported, expected, strict=True):
        assert want["row_error"] > 1e-5 and got["row_error"] == pytest.approx(want["row_error"], rel=1e-2)
        assert got["column_error"] == pytest.approx(want["column_error"], rel=1e-3, abs=1e-6)
        assert got["column_std"] == pytest.approx(want["column_std"], rel=1e-3, abs=1e-6)


@pytest.mark.slow
def test_demo_refuses_a_foreign_folder_and_overwrite_keeps_foreign_files(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="not an earlier demo output .*notes.txt.*--overwrite"):
        _run(out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]

    assert _run(out, "--overwrite") == 0
    assert (out / "notes.txt").read_text() == "keep me"
    assert {p.name for p in out.iterdir()} == {"notes.txt", *demo.ENTRIES}
    with pytest.raises(SystemExit, match="not an earlier demo output"):  # still foreign content in it
        _run(out)


def test_demo_failure_leaves_the_earlier_output_and_no_staging(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    (out / "softmax").mkdir(parents=True)
    (out / "softmax" / "results.json").write_text("{}")
    (out / demo.MANIFEST).write_text(json.dumps({"written_by": "sinkhorn-hf demo"}))

    def broken(arm, *args):
        raise RuntimeError(f"{arm} arm failed")

    monkeypatch.setattr(demo, "train_arm", broken)
    with pytest.raises(RuntimeError, match="softmax arm failed"):
        _run(out)
    assert (out / "softmax" / "results.json").read_text() == "{}"
    assert {p.name for p in out.iterdir()} == {"softmax", demo.MANIFEST, demo.DATA_FILE}

    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError):
        _run(fresh)
    assert {p.name for p in fresh.iterdir()} == {demo.DATA_FILE}  # only what it wrote; staging removed


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--sinkhorn_iterations", "0"], "iterations"),
        (["--num_train_epochs", "0"], "--num_train_epochs must be >= 1"),
        (["--max_train_samples", "0"], "--max_train_samples must be >= 1"),
    ],
)
def test_demo_bad_flags_are_clear_errors(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        main(["demo", "--output_dir", str(tmp_path / "out"), *flags])
    assert not (tmp_path / "out").exists()


def test_demo_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match="exists and is not a directory"):
        main(["demo", "--output_dir", str(tmp_path / "file")])


@pytest.mark.slow
def test_full_demo_from_the_console_script(tmp_path):
    """The README's first command at full size: both arms learn the digits."""
    run = subprocess.run(
        [sys.executable, "-m", "sinkhorn_hf.cli", "demo", "--output_dir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    accuracy = _accuracies(run.stdout)
    assert set(accuracy) == {"SoftMax (sdpa)", "Sinkhorn K=3"} and min(accuracy.values()) > 0.85, run.stdout
    assert (tmp_path / "demo" / "softmax" / "results.json").is_file()
    assert (tmp_path / "demo" / "sinkhorn" / "results.json").is_file()
    assert (tmp_path / "demo" / demo.PLOT_FILE).is_file()
