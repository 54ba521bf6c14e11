"""Fixtures shared by every test package: where ../shared (real data and models, read-only) lives."""

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MINILM = SHARED / "models" / "all-MiniLM-L6-v2"


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    if not (MINILM / "config.json").is_file():
        pytest.skip(f"the real pretrained MiniLM is not at {MINILM} (see ../shared/README.md)")
    return MINILM
