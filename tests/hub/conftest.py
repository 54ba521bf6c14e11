"""Fixtures for the hub tests (helpers are in hub_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hub_helpers import save_tiny_bert


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """Read-only for tests: a saved tiny BERT classifier with its tokenizer."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))
