"""Fixtures of the adjoint tests (helpers live in adjoint_helpers.py)."""

import pytest
from adjoint_helpers import CONFIGS


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every adjoint test on one thread (tests/conftest.py says why)."""


@pytest.fixture(params=list(CONFIGS))
def model_type(request) -> str:
    return request.param
