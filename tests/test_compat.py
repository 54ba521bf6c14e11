"""Every private internal of transformers / huggingface_hub / accelerate that sinkhorn_hf relies on still exists."""

import pytest

from sinkhorn_hf import compat


def test_every_declared_internal_exists():
    missing = compat.missing_internals()
    assert not missing, "installed libraries lack internals sinkhorn_hf relies on:\n" + "\n".join(missing)


def test_a_missing_internal_is_named_readably(monkeypatch):
    monkeypatch.setattr(compat, "INTERNALS", [compat.Internal("transformers", "no_such_thing", "a test")])
    (line,) = compat.missing_internals()
    assert line.startswith("transformers.no_such_thing (a test): ")


@pytest.mark.parametrize("internal", compat.INTERNALS, ids=lambda i: f"{i.module}.{i.attribute}")
def test_internal_resolves(internal):
    assert compat._resolve(internal) is not None
