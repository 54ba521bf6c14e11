"""Fixtures of the attention tests: one tiny model per family of the BERT/ViT generation (models come from
tests/tiny_models.py; the newer families are checked by test_family_rule.py)."""

from __future__ import annotations

import pytest
from tiny_models import CLASSIC_FAMILIES


@pytest.fixture(params=CLASSIC_FAMILIES)
def family(request) -> str:
    return request.param
