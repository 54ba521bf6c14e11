"""scripts/bench_attention.py on tiny sizes: a padded-batch table with every method, the masks it uses, and a
resume with other settings refused."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture
def bench(load_script):
    return load_script("bench_attention")


def tiny(out, *extra):
    return ["--sizes", "16", "--iterations", "1", "3", "--batch", "3", "--heads", "2", "--dim", "8", "--repeats", "1",
            "--no-memory", "--output", str(out), *extra]  # fmt: skip


def test_padded_table_times_every_method_and_resumes(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(tiny(out, "--padded"))
    table = capsys.readouterr().out
    assert "padded batch (key lengths N, 0.8N, 0.6N, N)" in table
    for label in ("| 16 | sdpa |", "| 16 | eager |", "| 16 | sinkhorn K=1 (sdpa) |", "| 16 | sinkhorn K=3 (dense) |"):
        assert label in table
    stored = json.loads(out.read_text())
    assert stored["settings"]["padded"] is True
    assert set(stored["sizes"]["16"]) == {"sdpa", "eager", "sinkhorn1", "sinkhorn3"}
    assert all(row["forward_s"] > 0 and row["train_s"] > 0 for row in stored["sizes"]["16"].values())
    bench.main(tiny(out, "--padded"))  # nothing left to do: the stored rows are printed again
    assert "| 16 | sinkhorn K=3 (dense) |" in capsys.readouterr().out


def test_a_resume_with_other_settings_is_refused(bench, tmp_path):
    out = tmp_path / "bench.json"
    bench.main(tiny(out))
    with pytest.raises(SystemExit, match=r"other settings .*'padded': \(False, True\)"):
        bench.main(tiny(out, "--padded"))


def test_the_padding_masks_keys_and_queries_alike(bench):
    allowed, query_valid = bench.padding(4, 10, "cpu")
    assert allowed.shape == (4, 1, 10, 10) and query_valid.shape == (4, 1, 10, 1)
    lengths = query_valid[:, 0, :, 0].sum(-1)
    assert lengths.tolist() == [10, 8, 6, 10]
    assert torch.equal(allowed[:, 0, 0, :], query_valid[:, 0, :, 0])  # keys valid exactly where queries are
    assert allowed.all(dim=-2).eq(allowed.any(dim=-2)).all()  # the same keys for every query


def test_the_matmul_floor_is_one_arm_timed_beside_the_routes(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(tiny(out, "--baselines", "matmul-floor"))
    assert "| 16 | (Q Kᵀ) V alone, no normalisation |" in capsys.readouterr().out
    assert set(json.loads(out.read_text())["sizes"]["16"]) == {"sdpa", "eager", "sinkhorn1", "sinkhorn3", "floor"}
    q, k, v = (torch.randn(2, 3, 5, 4) for _ in range(3))
    torch.testing.assert_close(bench._attention("floor")(q, k, v), q @ k.transpose(-1, -2) @ v)
