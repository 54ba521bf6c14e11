"""The only module that touches private internals of transformers, huggingface_hub and accelerate.

Every private name the package relies on is reached through this module and declared in :data:`INTERNALS` with
what we rely on it for, so an upgrade that removes one fails :func:`missing_internals` (and the test that calls
it) with a readable message instead of an ``AttributeError`` deep inside a forward pass.
"""

from __future__ import annotations

import importlib
from typing import Any, NamedTuple


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


# --- transformers: auto-class mappings, model construction (hub/, training/) ---

_MAPPING_NAMES = _declare(
    "transformers.models.auto.modeling_auto",
    "MODEL_MAPPING_NAMES",
    "model_type -> architecture name tables of the Auto classes: which head a saved config has (hub/model_kind)",
)
_FROM_CONFIG = _declare(
    "transformers",
    "PreTrainedModel._from_config",
    "build a concrete model class from a config (Auto classes have from_config, model classes only this)",
)


def auto_mapping_names(table: str) -> dict[str, str | tuple[str, ...]]:
    """``modeling_auto.<table>`` (e.g. ``MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES``): model_type -> the
    architecture name(s) of that head; ``MODEL_MAPPING_NAMES`` is the bare encoder's."""
    module = importlib.import_module(_MAPPING_NAMES.module)
    if not table.endswith("MAPPING_NAMES") or not hasattr(module, table):
        raise AttributeError(f"transformers has no auto mapping {table!r} ({_MAPPING_NAMES.why})")
    return getattr(module, table)


def model_from_config(model_class: type, config: Any) -> Any:
    """``model_class.from_config(config)`` for an Auto class, ``model_class._from_config(config)`` otherwise."""
    build = getattr(model_class, "from_config", None) or getattr(model_class, _FROM_CONFIG.attribute.rsplit(".", 1)[-1])
    return build(config)


# --- huggingface_hub: repository file selection, card parsing (hub/) ---

_YAML_BLOCK = _declare(
    "huggingface_hub.repocard", "REGEX_YAML_BLOCK", "the card metadata block that ModelCard parses (hub/push)"
)
_IGNORE_PATTERNS = _declare(
    "huggingface_hub.utils", "DEFAULT_IGNORE_PATTERNS", "what upload_folder always leaves out (.git, caches)"
)
_FILTER = _declare(
    "huggingface_hub.utils", "filter_repo_objects", "upload_folder's own file filter, so a dry run lists its files"
)


def has_card_metadata(text: str) -> bool:
    """Whether ``text`` starts with the ``---`` yaml ``---`` block huggingface_hub reads card metadata from."""
    return _resolve(_YAML_BLOCK).search(text) is not None


def upload_selection(files: list[str], ignore_patterns: list[str]) -> list[str]:
    """The ``files`` that ``upload_folder(..., ignore_patterns=...)`` sends, its default ignores included."""
    patterns = list(ignore_patterns) + list(_resolve(_IGNORE_PATTERNS))
    return list(_resolve(_FILTER)(files, ignore_patterns=patterns))


# --- accelerate (training/) ---

_ACCELERATE_STATE = _declare(
    "accelerate.state",
    "AcceleratorState._reset_state",
    "forget the process-wide accelerate state, so a second Accelerator in one process starts clean (tests)",
)
_GRADIENT_STATE = _declare("accelerate.state", "GradientState._reset_state", "the same for the gradient state")


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide singletons, as a new process would start."""
    _resolve(_ACCELERATE_STATE)(True)
    _resolve(_GRADIENT_STATE)()
