"""A non-editable install puts the card template inside the sinkhorn_hf package, and nothing beside it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from setuptools import find_packages

from sinkhorn_hf.hub.card import TEMPLATE_NAME, default_template

ROOT = Path(__file__).resolve().parents[2]


def test_the_package_list_is_the_source_tree():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert sorted(listed) == sorted([*find_packages(ROOT, include=["sinkhorn_hf*"]), "sinkhorn_hf.model_cards"])


def test_a_source_checkout_finds_the_template():
    assert default_template() == ROOT / "model_cards" / TEMPLATE_NAME


@pytest.mark.slow
def test_installed_template_lives_inside_the_package(tmp_path):
    # Build from the tracked files only, as a fresh clone would: a stale build/ in the checkout would leak in.
    source = tmp_path / "source"
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True, check=True)
    for name in tracked.stdout.splitlines():
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    target = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", str(source), "--target", str(target), "--no-deps",
               "--no-build-isolation", "--quiet"]  # fmt: skip
    done = subprocess.run(install, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    top_level = {p.name for p in target.iterdir() if not p.name.endswith(".dist-info")}
    assert top_level == {"sinkhorn_hf", "bin"}  # bin: the sinkhorn-hf console script
    assert (target / "sinkhorn_hf" / "model_cards" / TEMPLATE_NAME).is_file()
    found = subprocess.run(
        [sys.executable, "-c", "from sinkhorn_hf.hub.card import default_template; print(default_template())"],
        capture_output=True, text=True, cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert found.returncode == 0, found.stderr[-3000:]
    assert Path(found.stdout.strip()) == target / "sinkhorn_hf" / "model_cards" / TEMPLATE_NAME
