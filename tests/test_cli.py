"""The ``sinkhorn-hf`` console script as a user runs it."""

import subprocess
import sys

import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sinkhorn_hf.attention.diagnostics import MarginalReport, column_spread_figure
from sinkhorn_hf.cli import main
from sinkhorn_hf.commands import diagnose


def _assert_nothing_clipped(fig: Figure) -> None:
    """Drawn at its saved size and dpi, the title, axis labels, legend texts and every drawn artist of ``fig``
    (its tight bounding box: tick labels in view included) lie inside the figure."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer, box = canvas.get_renderer(), fig.bbox
    (ax,) = fig.axes
    texts = [ax.title, ax.xaxis.label, ax.yaxis.label]
    texts += ax.get_legend().get_texts() if ax.get_legend() else []
    extents = {t.get_text(): t.get_window_extent(renderer) for t in texts}
    extents["everything drawn"] = fig.get_tightbbox(renderer).transformed(fig.dpi_scale_trans)
    assert all(texts) and all(t.get_text().strip() for t in texts)
    for name, extent in extents.items():
        assert box.x0 - 0.5 <= extent.x0 and extent.x1 <= box.x1 + 0.5, f"{name!r} clipped: {extent} vs {box}"
        assert box.y0 - 0.5 <= extent.y0 and extent.y1 <= box.y1 + 0.5, f"{name!r} clipped: {extent} vs {box}"


@pytest.fixture
def saved_figures(monkeypatch) -> list[Figure]:
    """Every figure saved during the test (savefig still writes the file)."""
    figures, save = [], Figure.savefig

    def record(fig, *args, **kwargs):
        figures.append(fig)
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return figures


@pytest.mark.slow
def test_console_script_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "sinkhorn_hf.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "demo" in out.stdout and "diagnose" in out.stdout


def test_diagnose_writes_plot_and_json(minilm_path, tmp_path, capsys):
    plot, report = tmp_path / "spread.png", tmp_path / "report.json"
    assert main(["diagnose", str(minilm_path), "--plot", str(plot), "--json", str(report)]) == 0
    assert plot.stat().st_size > 1000 and plot.read_bytes()[:4] == b"\x89PNG"
    assert "column_std" in report.read_text()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_diagnose_plot_is_labelled_and_unclipped(minilm_path, tmp_path, saved_figures):
    assert main(["diagnose", str(minilm_path), "--plot", str(tmp_path / "spread.png")]) == 0
    (fig,) = saved_figures
    (ax,) = fig.axes
    assert ax.get_title() == "all-MiniLM-L6-v2: SoftMax column-sum spread (3 sentences)"  # folder name, no path
    assert "layer" in ax.get_xlabel() and "std of column sums" in ax.get_ylabel()
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(layer) for layer in range(6)]  # MiniLM-L6
    _assert_nothing_clipped(fig)


def test_two_arm_spread_figure_has_a_legend_and_nothing_clipped():
    report = MarginalReport(torch.rand(3, 4), torch.rand(3, 4), torch.rand(3, 4))
    long_title = "a model name that goes on and on, " * 4 + "column-sum spread"
    fig = column_spread_figure({"SoftMax (sdpa)": report, "Sinkhorn K=3": report}, title=long_title)
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["SoftMax (sdpa)", "Sinkhorn K=3"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2"]
    _assert_nothing_clipped(fig)


@pytest.mark.parametrize(
    ("model", "label"),
    [
        ("../shared/models/all-MiniLM-L6-v2/", "all-MiniLM-L6-v2"),
        ("sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2"),
        ("bert-base-uncased", "bert-base-uncased"),
    ],
)
def test_diagnose_model_label_is_the_short_name(model, label):
    assert diagnose.model_label(model) == label


def test_diagnose_missing_text_file_is_a_clear_error(minilm_path, tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        main(["diagnose", str(minilm_path), "--text-file", str(tmp_path / "nope.txt")])
