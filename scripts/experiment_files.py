"""What the experiment scripts share: the ``results.json`` of a grid of runs, rewritten atomically after every run
(:mod:`sinkhorn_hf.atomic_files`, so a killed grid leaves the previous results readable), measuring workers in fresh
processes, and the Markdown tables they print."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from sinkhorn_hf.atomic_files import write_json_atomic


def write_grid_results(
    path: Path, settings: dict, runs: list[dict], summarise: Callable[[list[dict]], list[dict]]
) -> list[dict]:
    """Write ``{"settings": settings, "runs": runs, "summary": summarise(runs)}`` to ``path`` atomically (JSON,
    indent 1); returns the summary. Rewritten after every finished run, so a cut-short grid keeps what it did."""
    summary = summarise(runs)
    write_json_atomic(path, {"settings": settings, "runs": runs, "summary": summary}, indent=1)
    return summary


def run_depth_grid(
    out: Path, shape: dict, depths: list[int], configs: list[str], run_one: Callable[[int, str], dict], desc: str
) -> list[dict]:
    """Every (depth, config) cell that ``out/results.json`` does not hold yet for the same ``shape``, run by
    ``run_one`` and added to the file atomically after each, so a killed grid resumes where it stopped; returns all
    results (each a dict with at least ``depth`` and ``config``)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    results = saved.get("results", []) if saved.get("shape") == shape else []
    done = {(r["depth"], r["config"]) for r in results}
    todo = [(d, c) for d in depths for c in configs if (d, c) not in done]
    for depth, config in tqdm(todo, desc=desc):
        results.append(run_one(depth, config))
        write_json_atomic(path, {"shape": shape, "results": results}, indent=1)
    return results


def run_memory_worker(command: list[str], what: str) -> dict:
    """Run a measuring ``command`` in a fresh process and parse the JSON of its last stdout line. glibc returns
    freed memory at once there, so resident memory tracks live tensors."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """``rows`` of cells under ``header`` as a Markdown table, one line a row and a final newline."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
