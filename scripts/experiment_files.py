"""Files the experiment scripts write: atomically, so that a killed run leaves the previous results readable; and
the Markdown tables they print."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling and a rename: readers see the old or the new file."""
    with tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    ) as tmp:
        try:
            tmp.write(text)
        except BaseException:
            tmp.close()
            os.unlink(tmp.name)  # our own temporary file, never the target
            raise
    os.replace(tmp.name, path)


def save_figure_atomic(figure: Any, path: Path) -> None:
    """Save a matplotlib ``figure`` as a 120 dpi PNG through a temporary sibling and a rename, then close it."""
    import matplotlib.pyplot as plt

    temporary = path.with_name(f".{path.name}.tmp.png")  # .png: savefig picks the format from the name
    figure.savefig(temporary, dpi=120)
    plt.close(figure)
    os.replace(temporary, path)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """``rows`` of cells under ``header`` as a Markdown table, one line a row and a final newline."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
