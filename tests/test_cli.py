"""The ``sinkhorn-hf`` console script as a user runs it."""

import subprocess
import sys

import pytest

from sinkhorn_hf.cli import main


def test_demo_prints_marginals_and_change(capsys):
    assert main(["demo", "--iterations", "5"]) == 0
    out = capsys.readouterr().out
    assert "K=5" in out and "max|col sum-1|" in out and "relative change" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit() and len(line.split()) == 4]
    assert len(rows) == 4 and all(float(row[1]) < 1e-5 for row in rows)  # odd K: rows exact


@pytest.mark.slow
def test_console_script_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "sinkhorn_hf.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "demo" in out.stdout and "diagnose" in out.stdout


def test_diagnose_writes_plot_and_json(minilm_path, tmp_path, capsys):
    plot, report = tmp_path / "spread.png", tmp_path / "report.json"
    assert main(["diagnose", str(minilm_path), "--plot", str(plot), "--json", str(report)]) == 0
    assert plot.stat().st_size > 1000 and plot.read_bytes()[:4] == b"\x89PNG"
    assert "column_std" in report.read_text()


def test_diagnose_missing_text_file_is_a_clear_error(minilm_path, tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        main(["diagnose", str(minilm_path), "--text-file", str(tmp_path / "nope.txt")])
