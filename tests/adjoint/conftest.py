"""Fixtures of the adjoint tests (helpers live in adjoint_helpers.py)."""

import pytest
from adjoint_helpers import CONFIGS


@pytest.fixture(params=list(CONFIGS))
def model_type(request) -> str:
    return request.param
