"""scripts/reproduce_adjoint.py, scripts/bench_memory.py and scripts/bench_adjoint_memory.py on small sizes."""

from __future__ import annotations

import json

import pytest
from adjoint_helpers import script_module


@pytest.mark.slow
def test_reproduce_adjoint_small(tmp_path, capsys, monkeypatch):
    reproduce = script_module("reproduce_adjoint")
    args = ["--depths", "8", "16", "--settings", "smooth", "--out", str(tmp_path)]
    assert reproduce.main(args) == 0
    printed = capsys.readouterr().out
    assert "| smooth θ(n/N), scale 1/N | heun |" in printed and "N=16" in printed
    assert (tmp_path / "adjoint_error.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    points = {
        (p["setting"], p["scheme"], p["depth"]): p["grad_rel_error"]
        for p in json.loads((tmp_path / "results.json").read_text())
    }
    assert len(points) == 4
    for depth in (8, 16):  # the paper's shape: with smooth weights, Heun's reverse beats Euler's
        assert points[("smooth", "heun", depth)] < points[("smooth", "euler", depth)]
    for scheme in ("euler", "heun"):  # and the error falls with depth
        assert points[("smooth", scheme, 16)] < points[("smooth", scheme, 8)]
    # A rerun resumes: nothing is measured again.
    monkeypatch.setattr(script_module("adjoint_experiments"), "measure", lambda *a: pytest.fail("measured again"))
    assert reproduce.main(args) == 0
    with pytest.raises(SystemExit):
        reproduce.main(["--depths", "1", "--out", str(tmp_path)])


def test_bench_memory_worker_and_table():
    bench = script_module("bench_memory")
    common = ["--seq-len", "16", "--batch-size", "2", "--hidden", "32", "--heads", "2", "--steps", "1"]
    rows = [bench.worker(bench.parse([*common, "--worker", "--depth", "2", "--config", c])) for c in ("plain", "euler")]
    assert all(r["peak_bytes"] >= 0 and r["step_s"] > 0 for r in rows)
    text = bench.table(rows, [2], ["plain", "euler"])
    assert text.splitlines()[2].startswith("| 2 | ") and "(1.00)" in text
    with pytest.raises(SystemExit):
        bench.parse(["--hidden", "30", "--heads", "4"])


@pytest.mark.slow
def test_bench_memory_runs_each_config_in_its_own_process(tmp_path, capsys):
    bench = script_module("bench_memory")
    args = [
        "--depths",
        "2",
        "--configs",
        "plain",
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--hidden",
        "32",
        "--heads",
        "2",
        "--steps",
        "1",
        "--out",
        str(tmp_path),
    ]
    assert bench.main(args) == 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["config"] for r in saved["results"]] == ["plain"]
    assert "| 2 |" in capsys.readouterr().out


def test_bench_adjoint_memory_table_reports_growth_against_checkpointing():
    bench = script_module("bench_adjoint_memory")
    mib = 2**20
    results = [
        {"depth": d, "config": c, "peak_bytes": b * mib}
        for d, c, b in [(6, "checkpoint", 100), (24, "checkpoint", 300), (6, "euler", 90), (24, "euler", 150)]
    ]
    table = bench.table(results, [6, 24], ["checkpoint", "euler", "plain"])
    assert "| checkpoint | 100 | 300 | 200 | 1.00 |" in table
    assert "| euler | 90 | 150 | 60 | 0.30 |" in table
    assert "| plain | – | – | – | – |" in table
    with pytest.raises(SystemExit):
        bench.parse(["--depths", "24", "6"])  # depths must increase: growth is from the first to the last
