"""The only module that touches private internals of transformers, huggingface_hub and accelerate.

Every private name the package relies on is reached through this module and declared in :data:`INTERNALS` with
what we rely on it for, so an upgrade that removes one fails :func:`missing_internals` (and the test that calls
it) with a readable message instead of an ``AttributeError`` deep inside a forward pass.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
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

_OUTPUT_COLLECTOR = _declare(
    "transformers.utils.output_capturing",
    "_active_collector",
    "the ContextVar holding the outputs a model's forward records (SigLIP asks for attentions only through it)",
)
_ATTN_CHECK = _declare(
    "transformers",
    "PreTrainedModel.get_correct_attn_implementation",
    "wrapped to refuse attn_implementation='sinkhorn' where it would silently not run",
)
_CAN_SET_ATTN = _declare(
    "transformers",
    "PreTrainedModel._can_set_attn_implementation",
    "whether a model class routes its attention through the AttentionInterface",
)
_CONFIG_ATTN = _declare(
    "transformers",
    "PreTrainedConfig._attn_implementation",
    "the property reading _attn_implementation_internal: the attention a config asks for (dropped by to_dict)",
)
_CONFIG_TO_DICT = _declare(
    "transformers", "PreTrainedConfig.to_dict", "wrapped so that saved configs keep attn_implementation"
)
_FROM_PRETRAINED = _declare(
    "transformers",
    "PreTrainedModel.from_pretrained",
    "wrapped (as a classmethod) so that sinkhorn_* keyword arguments reach an explicitly passed config",
)
_PATCHED = "_sinkhorn_guard"  # marks our wrappers, so that patching twice wraps once


_output_collector = None  # set by warm_output_collector()


def warm_output_collector() -> None:
    """Resolve transformers' output collector now, outside compiled code: resolving imports a module, which
    torch.compile cannot trace. Its value is a ``CompileableContextVar`` (a ContextVar in eager mode, a global
    while torch.compile traces), so reading it compiles."""
    global _output_collector
    _output_collector = _resolve(_OUTPUT_COLLECTOR)


def active_output_collector():
    """The output collector of the forward pass now running (falsy when none records outputs): the names of the
    outputs being recorded."""
    if _output_collector is None:
        warm_output_collector()
    return _output_collector.get()


def can_set_attn_implementation(model_class: type) -> bool:
    """Whether ``model_class`` lets transformers choose its attention implementation (routes it through the
    AttentionInterface)."""
    return bool(model_class._can_set_attn_implementation())


def config_attn_implementation(config) -> str | None:
    """The attention implementation ``config`` holds (None when it was never set)."""
    return getattr(config, "_attn_implementation_internal", None)


def _patch_once(owner: type, name: str, wrap) -> None:
    """Replace ``owner.name`` by ``wrap(owner.name)`` unless it is already one of our wrappers."""
    original = getattr(owner, name)
    if getattr(original, _PATCHED, False):
        return
    wrapper = functools.wraps(original)(wrap(original))
    setattr(wrapper, _PATCHED, True)
    setattr(owner, name, wrapper)


def patch_attn_implementation_check(check: Callable[[Any, str | None], None]) -> None:
    """Call ``check(model, requested)`` (which may raise) before transformers validates a requested
    attn_implementation, at init and on ``set_attn_implementation``. Idempotent."""
    from transformers import PreTrainedModel

    def wrap(original):
        def wrapper(self, requested_attention: str | None, is_init_check: bool = False) -> str:
            check(self, requested_attention)
            return original(self, requested_attention, is_init_check)

        return wrapper

    _patch_once(PreTrainedModel, _ATTN_CHECK.attribute.split(".")[-1], wrap)


def patch_config_to_dict(extend: Callable[[Any, dict], None]) -> None:
    """Let ``extend(config, output)`` add keys to every ``PreTrainedConfig.to_dict()``, hence to saved config
    files. Idempotent."""
    from transformers import PreTrainedConfig

    def wrap(original):
        def wrapper(self) -> dict:
            output = original(self)
            extend(self, output)
            return output

        return wrapper

    _patch_once(PreTrainedConfig, "to_dict", wrap)


def patch_from_pretrained_kwargs(adjust: Callable[[dict], None]) -> None:
    """Let ``adjust(kwargs)`` edit the keyword arguments of every ``PreTrainedModel.from_pretrained`` call (Auto
    classes end there too) before transformers reads them. Idempotent."""
    from transformers import PreTrainedModel

    original = PreTrainedModel.__dict__["from_pretrained"].__func__
    if getattr(original, _PATCHED, False):
        return

    @functools.wraps(original)
    def wrapper(cls, *args, **kwargs):
        adjust(kwargs)
        return original(cls, *args, **kwargs)

    setattr(wrapper, _PATCHED, True)
    PreTrainedModel.from_pretrained = classmethod(wrapper)


def set_config_class_defaults(defaults: dict[str, Any]) -> None:
    """Give ``PreTrainedConfig`` class-level defaults for the names it lacks: transformers routes
    ``from_pretrained(..., key=value)`` into a config only for keys the config already has (instances override
    them, and only instance values are saved)."""
    from transformers import PreTrainedConfig

    for name, default in defaults.items():
        if not hasattr(PreTrainedConfig, name):
            setattr(PreTrainedConfig, name, default)


# --- transformers: layer stacks and output collection (adjoint/) ---


# --- transformers: auto-class mappings, model construction (hub/, training/) ---


# --- huggingface_hub: repository file selection, card parsing (hub/) ---


# --- accelerate (training/) ---
