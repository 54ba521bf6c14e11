"""What the experiment scripts share: the ``results.json`` of a grid of runs, rewritten atomically after every run
(:mod:`sinkhorn_hf.atomic_files`, so a killed grid leaves the previous results readable), and the Markdown tables
they print."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sinkhorn_hf.atomic_files import write_json_atomic


def write_grid_results(
    path: Path, settings: dict, runs: list[dict], summarise: Callable[[list[dict]], list[dict]]
) -> list[dict]:
    """Write ``{"settings": settings, "runs": runs, "summary": summarise(runs)}`` to ``path`` atomically (JSON,
    indent 1); returns the summary. Rewritten after every finished run, so a cut-short grid keeps what it did."""
    summary = summarise(runs)
    write_json_atomic(path, {"settings": settings, "runs": runs, "summary": summary}, indent=1)
    return summary


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """``rows`` of cells under ``header`` as a Markdown table, one line a row and a final newline."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
