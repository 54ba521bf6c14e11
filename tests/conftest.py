"""Shared by every test package: where ../shared (real data and models, read-only) lives; Triton's interpreter;
every test on one torch thread."""

import os
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is first imported (torch.compile and others import it early), so the CPU
# interpreter for the kernel tests must be chosen here, before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MINILM = SHARED / "models" / "all-MiniLM-L6-v2"


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    if not (MINILM / "config.json").is_file():
        pytest.skip(f"the real pretrained MiniLM is not at {MINILM} (see ../shared/README.md)")
    return MINILM


@pytest.fixture(autouse=True)
def one_thread():
    """Torch on one thread for every test: the tests run tiny matrices, where a second thread only waits for a core
    (and on other jobs sharing the cores), which makes them up to 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
