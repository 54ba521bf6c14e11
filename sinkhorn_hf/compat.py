"""The only module that touches private internals of transformers, huggingface_hub and accelerate.

Every private name the package relies on is reached through this module and declared in :data:`INTERNALS` with
what we rely on it for, so an upgrade that removes one fails :func:`missing_internals` (and the test that calls
it) with a readable message instead of an ``AttributeError`` deep inside a forward pass.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
    "the ContextVar holding the outputs a model's forward records (SigLIP asks for attentions only through it; "
    "the adjoint resets it around extra layer evaluations)",
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
    "the property reading _attn_implementation_internal: the attention a config asks for (dropped by to_dict); its "
    "setter takes every requested attn_implementation (a dict keyed by sub-config names), so it is wrapped to check "
    "the keys",
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


def output_collector_var():
    """transformers' output collector variable (its value: the names of the outputs being recorded)."""
    if _output_collector is None:
        warm_output_collector()
    return _output_collector


def active_output_collector():
    """The output collector of the forward pass now running (falsy when none records outputs)."""
    return output_collector_var().get()


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
    _patch_model_builder(_FROM_PRETRAINED, before=adjust)


def patch_attn_implementation_request(validate: Callable[[Any, Any], None], verify: Callable[[Any, Any], None]) -> None:
    """Call ``validate(config, requested)`` (which may raise) wherever transformers takes an ``attn_implementation``
    (a name, or a dict keyed by sub-config names): the config property it is written to (config construction,
    ``from_pretrained``, ``from_config``) and ``set_attn_implementation``. Call ``verify(model, requested)`` on the
    model those calls return or change. Idempotent."""
    from transformers import PreTrainedConfig, PreTrainedModel

    prop = PreTrainedConfig.__dict__[_CONFIG_ATTN.attribute.split(".")[-1]]
    if not getattr(prop.fset, _PATCHED, False):

        @functools.wraps(prop.fset)
        def setter(config, value):
            validate(config, value)
            prop.fset(config, value)

        setattr(setter, _PATCHED, True)
        setattr(PreTrainedConfig, _CONFIG_ATTN.attribute.split(".")[-1], property(prop.fget, setter, prop.fdel))

    def wrap(original):
        def wrapper(self, attn_implementation, *args: Any, **kwargs: Any) -> Any:
            validate(self.config, attn_implementation)
            result = original(self, attn_implementation, *args, **kwargs)
            verify(self, attn_implementation)
            return result

        return wrapper

    _patch_once(PreTrainedModel, "set_attn_implementation", wrap)
    for builder in (_FROM_PRETRAINED, _FROM_CONFIG):
        _patch_model_builder(builder, after=_VerifyBuilt(verify))


class _VerifyBuilt(NamedTuple):
    """``verify(model, kwargs["attn_implementation"])`` as a builder hook (equal hooks are added once)."""

    verify: Callable[[Any, Any], None]

    def __call__(self, model: Any, kwargs: dict) -> None:
        self.verify(model, kwargs.get("attn_implementation"))


def _patch_model_builder(
    builder: Internal,
    before: Callable[[dict], None] | None = None,
    after: Callable[[Any, dict], None] | None = None,
) -> None:
    """Wrap the classmethod ``PreTrainedModel.<builder>`` so that ``before(kwargs)`` may edit its keyword arguments
    and ``after(model, kwargs)`` sees the model it built with the keyword arguments it was given. One wrapper per
    builder: a later call adds its hooks to it."""
    from transformers import PreTrainedModel

    name = builder.attribute.split(".")[-1]
    original = PreTrainedModel.__dict__[name].__func__
    hooks = getattr(original, _PATCHED, None)
    if hooks is None:
        hooks = {"before": [], "after": []}

        @functools.wraps(original)
        def wrapper(cls, *args, **kwargs):
            for hook in hooks["before"]:
                hook(kwargs)
            given = dict(kwargs)
            result = original(cls, *args, **kwargs)
            model = result[0] if isinstance(result, tuple) else result  # (model, info) with output_loading_info
            for hook in hooks["after"]:
                hook(model, given)
            return result

        setattr(wrapper, _PATCHED, hooks)
        setattr(PreTrainedModel, name, classmethod(wrapper))
    for kind, hook in (("before", before), ("after", after)):
        if hook is not None and hook not in hooks[kind]:
            hooks[kind].append(hook)


def set_config_class_defaults(defaults: dict[str, Any]) -> None:
    """Give ``PreTrainedConfig`` class-level defaults for the names it lacks: transformers routes
    ``from_pretrained(..., key=value)`` into a config only for keys the config already has (instances override
    them, and only instance values are saved)."""
    from transformers import PreTrainedConfig

    for name, default in defaults.items():
        if not hasattr(PreTrainedConfig, name):
            setattr(PreTrainedConfig, name, default)


# --- transformers: layer stacks and output collection (adjoint/) ---

_POST_INIT = _declare(
    "transformers",
    "PreTrainedModel.post_init",
    "wrapped so that a model whose config stores adjoint_residual_scale runs with it from construction "
    "(from_pretrained, from_config), not only after enable_adjoint",
)


def patch_post_init(after: Callable[[Any], None]) -> None:
    """Call ``after(model)`` at the end of every ``PreTrainedModel.post_init`` (the end of a transformers model's
    ``__init__``: submodels first, then the model holding them). Idempotent."""
    from transformers import PreTrainedModel

    def wrap(original):
        def wrapper(self, *args: Any, **kwargs: Any) -> Any:
            result = original(self, *args, **kwargs)
            after(self)
            return result

        return wrapper

    _patch_once(PreTrainedModel, _POST_INIT.attribute.split(".")[-1], wrap)


@contextmanager
def outputs_not_captured() -> Iterator[None]:
    """Within the block, transformers collects no attention maps or hidden states from the layers it runs: the
    adjoint's extra evaluations (Heun's second branch call, probes) must add nothing to the model's outputs."""
    collector = output_collector_var()
    token = collector.set(None)
    try:
        yield
    finally:
        collector.reset(token)


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


def model_from_config(model_class: type, config: Any, **kwargs: Any) -> Any:
    """``model_class.from_config(config, **kwargs)`` for an Auto class, ``model_class._from_config(config,
    **kwargs)`` otherwise (e.g. ``attn_implementation="sdpa"``)."""
    build = getattr(model_class, "from_config", None) or getattr(model_class, _FROM_CONFIG.attribute.rsplit(".", 1)[-1])
    return build(config, **kwargs)


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


def upload_selection(files: list[str], allow_patterns: list[str] | None = None) -> list[str]:
    """The ``files`` that ``upload_folder(..., allow_patterns=...)`` sends, its default ignores included."""
    return list(
        _resolve(_FILTER)(files, allow_patterns=allow_patterns, ignore_patterns=list(_resolve(_IGNORE_PATTERNS)))
    )


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
