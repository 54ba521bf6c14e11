"""Fixtures of the adjoint tests (helpers live in adjoint_helpers.py)."""

import pytest
import torch
from adjoint_helpers import CONFIGS


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matrices: several threads only wait on each other (and on the other test runs sharing the cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=list(CONFIGS))
def model_type(request) -> str:
    return request.param
