"""scripts/reproduce_sinkformers.py and its model: end to end on a tiny synthetic MNIST, K = 1 against a float64
SoftMax reference and K = 3 against a float64 brute-force Sinkhorn, resuming a cut-short grid, refusing mixes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture
def script(monkeypatch):
    """The script as a module (scripts/ is not a package), with scripts/ importable for its model module."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    spec = importlib.util.spec_from_file_location("reproduce_sinkformers", SCRIPTS / "reproduce_sinkformers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def mnist_npz(tmp_path) -> Path:
    """200 train and 100 test random 28×28 uint8 images in the Keras mnist.npz layout."""
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny_mnist.npz"
    np.savez(
        path,
        x_train=rng.integers(0, 256, (200, 28, 28), dtype=np.uint8),
        y_train=rng.integers(0, 10, 200, dtype=np.uint8),
        x_test=rng.integers(0, 256, (100, 28, 28), dtype=np.uint8),
        y_test=rng.integers(0, 10, 100, dtype=np.uint8),
    )
    return path


def tiny_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--patch-sizes", "14", "--epochs", "1", "--device", "cpu", "--out", str(out), *extra]


def reference_logits(model: torch.nn.Module, images: torch.Tensor, iterations: int) -> torch.Tensor:
    """The authors' forward in float64 from the model's weights, with explicit alternating normalisation of
    exp(q kᵀ/√d): rows to 1 first, then columns to 1 (n_q = n_k), K steps; K = 1 is SoftMax."""
    p = {name: value.detach().double() for name, value in model.named_parameters()}
    x = torch.nn.functional.conv2d(images.double(), p["patches.weight"], p["patches.bias"], stride=model.patches.stride)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([p["cls_token"].expand(len(x), -1, -1), x], dim=1) + p["positions"]
    h = torch.nn.functional.layer_norm(x, x.shape[-1:], p["blocks.0.norm.weight"], p["blocks.0.norm.bias"])
    q, k, v = (h @ p["blocks.0.attention.to_qkv.weight"].T).chunk(3, dim=-1)
    weights = torch.exp(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5)
    for step in range(iterations):
        weights = weights / weights.sum(dim=-1 if step % 2 == 0 else -2, keepdim=True)
    out = (weights @ v) @ p["blocks.0.attention.to_out.weight"].T + p["blocks.0.attention.to_out.bias"]
    cls = (x + out)[:, 0]
    cls = torch.nn.functional.layer_norm(cls, cls.shape[-1:], p["head.0.weight"], p["head.0.bias"])
    return cls @ p["head.1.weight"].T + p["head.1.bias"]


@pytest.mark.parametrize("iterations", [1, 3])
def test_model_matches_float64_reference(script, iterations):
    from sinkformers_vit import AttentionOnlyViT

    torch.manual_seed(0)
    model = AttentionOnlyViT(patch_size=7, iterations=iterations).eval()
    images = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        logits = model(images)
    torch.testing.assert_close(logits.double(), reference_logits(model, images, iterations), rtol=1e-4, atol=1e-4)
    other = reference_logits(model, images, 3 if iterations == 1 else 1)
    assert (logits.double() - other).abs().max() > 1e-3  # the reference tells K = 1 from K = 3 apart


@pytest.mark.slow
def test_end_to_end_writes_both_arms(script, mnist_npz, tmp_path, capsys):
    out = tmp_path / "grid"
    arms = ["--lr", "paper", "1e-3"]
    assert script.main(tiny_args(mnist_npz, out, "--iterations", "1", "3", "--seeds", "0", "1", *arms)) == 0
    results = json.loads((out / "results.json").read_text())
    keys = sorted((r["iterations"], r["lr"], r["seed"]) for r in results["runs"])
    # paper arm: (1, 1e-3), (3, 2e-3); same-lr arm: (1, 1e-3) shared, (3, 1e-3)
    assert keys == sorted((k, lr, s) for k, lr in [(1, 1e-3), (3, 2e-3), (3, 1e-3)] for s in (0, 1))
    for run in results["runs"]:
        assert run["patch_size"] == 14 and run["epochs"] == 1 and len(run["test_accuracy"]) == 1
        assert run["best_test_accuracy"] == run["final_test_accuracy"] == run["test_accuracy"][0]
        assert 0 <= run["best_test_accuracy"] <= 100
        assert run["lr_per_epoch"] == [run["lr"]]
    assert {(row["iterations"], row["lr"], row["seeds"]) for row in results["summary"]} == {
        (1, 1e-3, 2),
        (3, 2e-3, 2),
        (3, 1e-3, 2),
    }
    assert (out / "accuracy_vs_patch_size.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 3 | 14 | 0.002 | 2 |" in capsys.readouterr().out


@pytest.mark.slow
def test_cut_short_grid_resumes_without_redoing_runs(script, mnist_npz, tmp_path, monkeypatch):
    out = tmp_path / "grid"
    script.main(tiny_args(mnist_npz, out, "--iterations", "1", "--seeds", "0"))
    first = json.loads((out / "results.json").read_text())["runs"]
    trained = []
    train_run = script.train_run
    monkeypatch.setattr(script, "train_run", lambda run, *a: trained.append(run) or train_run(run, *a))
    script.main(tiny_args(mnist_npz, out, "--iterations", "1", "3", "--seeds", "0"))
    assert [(run["iterations"], run["seed"]) for run in trained] == [(3, 0)]
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert runs[0] == first[0] and len(runs) == 2


def test_other_settings_are_refused(script, mnist_npz, tmp_path):
    out = tmp_path / "grid"
    script.main(tiny_args(mnist_npz, out, "--iterations", "1", "--seeds", "0"))
    before = (out / "results.json").read_text()
    with pytest.raises(SystemExit, match=r"other settings \(epochs: 1 there, 2 now.*refusing to mix"):
        script.main(tiny_args(mnist_npz, out, "--iterations", "1", "--seeds", "0") + ["--epochs", "2"])
    assert (out / "results.json").read_text() == before


def test_lr_schedule_scales_the_paper_milestones(script):
    assert script.milestones(45) == [34, 40]  # lr /10 from epoch 35, again from 41: the authors' schedule
    assert script.milestones(10) == [8, 9]
    assert script.milestones(1) == [1, 1]  # past the single epoch: never applied
    assert [script.paper_lr(k) for k in (1, 3, 5)] == [1e-3, 2e-3, 2e-3]


def test_bad_lr_arm_is_rejected(script, mnist_npz, tmp_path, capsys):
    with pytest.raises(SystemExit):
        script.main(tiny_args(mnist_npz, tmp_path, "--lr", "fast"))
    assert "an lr arm is 'paper' or a positive number" in capsys.readouterr().err
