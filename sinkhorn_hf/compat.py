"""The only module that touches private internals of transformers, huggingface_hub and accelerate.

Every private name the package relies on is reached through this module and declared in :data:`INTERNALS` with
what we rely on it for, so an upgrade that removes one fails :func:`missing_internals` (and the test that calls
it) with a readable message instead of an ``AttributeError`` deep inside a forward pass.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple


class Internal(NamedTuple):
    """A private attribute ``module.attribute`` (dotted attribute paths allowed) and why we need it."""

    module: str
    attribute: str
    why: str


INTERNALS: list[Internal] = []


def _declare(module: str, attribute: str, why: str) -> Internal:
    internal = Internal(module, attribute, why)
    INTERNALS.append(internal)
    return internal


def _resolve(internal: Internal):
    target = importlib.import_module(internal.module)
    for part in internal.attribute.split("."):
        target = getattr(target, part)
    return target


def missing_internals() -> list[str]:
    """One readable line per declared internal that the installed libraries no longer have."""
    missing = []
    for internal in INTERNALS:
        try:
            _resolve(internal)
        except (ImportError, AttributeError) as error:
            missing.append(f"{internal.module}.{internal.attribute} ({internal.why}): {error}")
    return missing


# --- transformers: attention registration, config persistence, output collection (attention/) ---


# --- transformers: layer stacks and output collection (adjoint/) ---

_ACTIVE_COLLECTOR = _declare(
    "transformers.utils.output_capturing",
    "_active_collector",
    "the ContextVar holding the collector of output_attentions / output_hidden_states; the adjoint resets it so "
    "that extra evaluations (Heun's second branch call, probes) add no attention maps to the model's outputs",
)


@contextmanager
def outputs_not_captured() -> Iterator[None]:
    """Within the block, transformers collects no attention maps or hidden states from the layers it runs."""
    collector = _resolve(_ACTIVE_COLLECTOR)
    token = collector.set(None)
    try:
        yield
    finally:
        collector.reset(token)


# --- transformers: auto-class mappings, model construction (hub/, training/) ---


# --- huggingface_hub: repository file selection, card parsing (hub/) ---


# --- accelerate (training/) ---
