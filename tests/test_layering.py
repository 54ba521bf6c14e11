"""The package's layers: root helpers, then attention and adjoint, then training and hub, then the command line.
A module may import from its own layer or below, never from above (lazy imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sinkhorn_hf"
# a module's room is its first component below sinkhorn_hf; root helpers (compat, families, ...) are layer 0
LAYERS = {"attention": 1, "adjoint": 1, "training": 2, "hub": 2, "commands": 3, "cli": 3, "__init__": 3}


def imported_rooms(path: Path, package: Path = PACKAGE) -> set[str]:
    """The rooms of ``package`` that ``path`` imports from, absolutely or relatively, anywhere in the file."""
    here = path.relative_to(package).with_suffix("").parts[:-1]  # what a relative import is resolved against
    targets = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = (*here[: len(here) - node.level + 1], *(node.module.split(".") if node.module else ()))
            targets += [base] if base else [(alias.name,) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == package.name:
            targets.append(tuple(node.module.split(".")[1:]) or ("__init__",))
        elif isinstance(node, ast.Import):
            dotted = [alias.name.split(".") for alias in node.names]
            targets += [tuple(parts[1:]) or ("__init__",) for parts in dotted if parts[0] == package.name]
    return {target[0] for target in targets}


def layer(room: str) -> int:
    return LAYERS.get(room, 0)


def test_every_kind_of_import_is_seen(tmp_path):
    package = tmp_path / "sinkhorn_hf"
    (package / "attention").mkdir(parents=True)
    module = package / "attention" / "probe.py"
    module.write_text(
        "from ..training import run\nfrom . import dense\nimport sinkhorn_hf.hub.card\nimport os\n"
        "def later():\n    from sinkhorn_hf.cli import main\n    from .. import compat\n"
    )
    assert imported_rooms(module, package) == {"training", "attention", "hub", "cli", "compat"}


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_import_runs_back_up_the_layers(path):
    own = path.relative_to(PACKAGE).with_suffix("").parts[0]
    upward = sorted(room for room in imported_rooms(path) if layer(room) > layer(own))
    assert not upward, (
        f"sinkhorn_hf/{path.relative_to(PACKAGE)} ({own}, layer {layer(own)}) imports from {upward}, a higher "
        f"layer ({LAYERS}); move the shared code down, or the import up"
    )
