"""Fixtures for the tests of scripts/ (not a package): loading a script as a module, and a tiny synthetic MNIST."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture
def load_script(monkeypatch):
    """``load_script(name)``: scripts/<name>.py as a module, with scripts/ importable for its sibling modules."""
    monkeypatch.syspath_prepend(str(SCRIPTS))

    def load(name: str) -> ModuleType:
        spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def tiny_mnist(tmp_path):
    """``tiny_mnist(n_train, n_test)``: random 28×28 uint8 images and labels in the Keras mnist.npz layout."""

    def write(n_train: int, n_test: int) -> Path:
        rng = np.random.default_rng(0)
        path = tmp_path / f"tiny_mnist_{n_train}_{n_test}.npz"
        np.savez(
            path,
            x_train=rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
            y_train=rng.integers(0, 10, n_train, dtype=np.uint8),
            x_test=rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
            y_test=rng.integers(0, 10, n_test, dtype=np.uint8),
        )
        return path

    return write
