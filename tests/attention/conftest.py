"""Fixtures of the attention tests: one tiny model per supported family (models come from tests/tiny_models.py)."""

from __future__ import annotations

import pytest
from tiny_models import ALL_FAMILIES


@pytest.fixture(params=ALL_FAMILIES)
def family(request) -> str:
    return request.param
