"""``attn_implementation="sinkhorn"``: the transformers attention function, its mask function, and the
guards that make the name safe to use (supported families only, encoders only, dict forms only under keys
transformers reads, checked to run where asked after loading, persisted on save, settings accepted by
``from_pretrained`` even next to an explicit ``config=``).

Masks: Sinkhorn normalises columns too, so it must know which *queries* are real. transformers hands an attention
function key masks only, so in self-attention a query counts as padding exactly when the key at its position is
blocked for every query; padding masks (what ``attention_mask`` is for) satisfy this. A custom 4D mask that blocks
some key for every query while its query is real must say so: pass ``sinkhorn_query_mask`` (B, Lq) bool, True =
real query, to the model's forward (it reaches every attention layer through transformers' forward kwargs).
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedConfig, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .. import compat
from ..families import UnsupportedModelError, check_supported
from .masking import support_from_mask
from .routes import sinkhorn_attention
from .settings import SinkhornSettings

ATTN_IMPLEMENTATION = "sinkhorn"
QUERY_MASK_KWARG = "sinkhorn_query_mask"
SETTING_ATTRIBUTES = tuple(f"sinkhorn_{field.name}" for field in dataclasses.fields(SinkhornSettings))
# Saved next to attn_implementation: a process that never imported sinkhorn_hf gets transformers' bare
# "not supported" error, and this key in config.json is what the user can read there.
HINT_KEY = "sinkhorn_hf_hint"
HINT = (
    'attn_implementation="sinkhorn" is provided by the sinkhorn-hf package: `pip install sinkhorn-hf`, then '
    "`import sinkhorn_hf` before from_pretrained"
)


class CausalSinkhornError(ValueError):
    """Sinkhorn attention was asked for a causal (decoder) attention."""


def sinkhorn_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, Tensor | None]:
    """Doubly stochastic attention: out = Sinkhorn_K(QKᵀ·scaling + bias) V.

    query (B, H, Lq, D), key/value (B, H, Lk, D), attention_mask as transformers passes it (see
    :mod:`.masking`). Returns the output (B, Lq, H, D) and, when ``output_attentions=True`` was passed to
    the model's forward, the attention matrices (B, H, Lq, Lk). Settings come from ``module.config``.
    """
    _refuse_causal(module, kwargs.get("is_causal"))
    settings = SinkhornSettings.from_config(module.config)
    key, value = _share_key_value_heads(key, value, query.shape[1])
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    support = None
    if attention_mask is not None:  # without a mask, skip building an all-True (Lq, Lk) support
        support = support_from_mask(attention_mask, query.shape[-2], key.shape[-2], query.device)
    query_valid = _query_valid(kwargs.get(QUERY_MASK_KWARG), support, query.shape)
    output, weights = sinkhorn_attention(
        query,
        key,
        value,
        allowed=None if support is None else support.allowed,
        bias=None if support is None else support.bias,
        query_valid=query_valid,
        scale=scaling,
        settings=settings,
        dropout=dropout if module.training else 0.0,
        return_weights=attentions_requested(kwargs),
    )
    output = output.transpose(1, 2).contiguous()
    return output, None if weights is None else weights.to(query.dtype)


def _refuse_causal(module: nn.Module, is_causal: bool | None) -> None:
    """Raise CausalSinkhornError if this call is causal: by the call's flag, the module's, or its config's
    ``is_decoder`` (which a user may set after loading; a flag read per call, never the mask's data)."""
    if is_causal is None:
        is_causal = getattr(module, "is_causal", False)
    if is_causal:
        raise CausalSinkhornError(
            f"{type(module).__name__} is causal, and sinkhorn attention cannot be: its column normalisation "
            "lets future tokens change the past. Use it on bidirectional encoders only (for a composite model, "
            'pass e.g. attn_implementation={"vision_config": "sinkhorn", "text_config": "sdpa"}).'
        )
    if getattr(module.config, "is_decoder", False):
        raise CausalSinkhornError(
            f"{type(module).__name__}'s config has is_decoder=True, so the model masks attention causally; sinkhorn "
            "attention is for bidirectional encoders only, as column normalisation leaks future tokens into the "
            "past. Set config.is_decoder = False, or use attn_implementation='sdpa' for a decoder."
        )


def _share_key_value_heads(key: Tensor, value: Tensor, query_heads: int) -> tuple[Tensor, Tensor]:
    """Grouped-query attention (EuroBERT): key/value (B, H_kv, Lk, D) -> (B, H, Lk, D), each key/value head
    serving the H / H_kv consecutive query heads of its group, as transformers' ``repeat_kv`` does for eager."""
    groups, remainder = divmod(query_heads, key.shape[1])
    if groups == 1 or remainder:  # unequal head counts that are no grouping: the route names the shapes
        return key, value
    return key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)


def _query_valid(query_mask: Tensor | None, support, query_shape: torch.Size) -> Tensor | None:
    """Valid queries (B, 1, Lq, 1): the user's ``sinkhorn_query_mask`` (B, Lq) when given, else the mask's guess."""
    if query_mask is None:
        return None if support is None else support.query_valid
    batch, _, q_len, _ = query_shape
    if query_mask.dtype != torch.bool or query_mask.dim() != 2 or query_mask.shape[1] != q_len:
        raise ValueError(
            f"{QUERY_MASK_KWARG} must be a bool tensor (batch, query_len) = (B, {q_len}), True = real query; got "
            f"{query_mask.dtype} of shape {tuple(query_mask.shape)}"
        )
    if query_mask.shape[0] not in (1, batch):
        raise ValueError(f"{QUERY_MASK_KWARG} has batch size {query_mask.shape[0]}, the input {batch}")
    return query_mask[:, None, :, None]


def attentions_requested(kwargs: dict) -> bool:
    """Whether the caller wants the attention matrices back.

    Some models (e.g. SigLIP) record them with transformers' output collector without passing
    ``output_attentions`` down to the attention function.
    """
    if kwargs.get("output_attentions"):
        return True
    collector = compat.active_output_collector()
    return bool(collector) and "attentions" in collector


def _check_sinkhorn_request(model: PreTrainedModel, requested_attention: str | None) -> None:
    """Refuse ``sinkhorn`` where it would silently not run (transformers accepts any registered name)."""
    if requested_attention != ATTN_IMPLEMENTATION:
        return
    check_supported(model.config, type(model).__name__)
    if not compat.can_set_attn_implementation(type(model)):
        raise UnsupportedModelError(
            f"{type(model).__name__}'s attention modules do not call transformers' AttentionInterface, so sinkhorn "
            "attention would not run."
        )
    if getattr(model.config, "is_decoder", False):
        raise CausalSinkhornError(
            f"{type(model).__name__} is configured as a decoder (is_decoder=True); sinkhorn attention is "
            "for bidirectional encoders only, as column normalisation leaks future tokens into the past."
        )
    SinkhornSettings.from_config(model.config)  # bad settings fail at load time, not at the first step


def _mentions_sinkhorn(requested: object) -> bool:
    if isinstance(requested, dict):
        return any(_mentions_sinkhorn(value) for value in requested.values())
    return requested == ATTN_IMPLEMENTATION


def _check_requested_keys(config: PreTrainedConfig | type, requested: object) -> None:
    """Refuse a dict ``attn_implementation`` that mentions sinkhorn under keys transformers would ignore (it reads
    ``""`` for the model itself and the names in ``config.sub_configs``, and silently keeps its default elsewhere).

    ``config``: the config (or config class) the dict is applied to; nested dicts are checked against sub-configs.
    """
    if not isinstance(requested, dict) or not _mentions_sinkhorn(requested):
        return
    sub_configs = getattr(config, "sub_configs", None) or {}
    unknown = [key for key in requested if key != "" and key not in sub_configs]
    if unknown:
        name = config.__name__ if isinstance(config, type) else type(config).__name__
        valid = ", ".join(["'' (the model itself)", *map(repr, sub_configs)])
        shared = (
            f"; {name} has no sub-configs, its parts share one config: pass a name (attn_implementation="
            '"sinkhorn") or load the part you want alone, e.g. WhisperForAudioClassification for Whisper\'s encoder'
            if not sub_configs
            else ""
        )
        raise ValueError(
            f"attn_implementation={requested!r} names {', '.join(map(repr, unknown))}, which {name} does not have, "
            f"so transformers would ignore it and run another attention where sinkhorn was asked for. Valid keys: "
            f"{valid}{shared}."
        )
    for key, value in requested.items():
        if key:  # the sub-config itself when built, else its class (a config under construction)
            sub_config = getattr(config, key, None)
            _check_requested_keys(sub_config if isinstance(sub_config, PreTrainedConfig) else sub_configs[key], value)


def _sinkhorn_configs(config: PreTrainedConfig, requested: object) -> list[PreTrainedConfig]:
    """The configs (``config`` and its sub-configs, at any depth) that ``requested`` asks to run sinkhorn."""
    own = requested.get("") if isinstance(requested, dict) else requested
    found = [config] if own == ATTN_IMPLEMENTATION else []
    for key in getattr(config, "sub_configs", None) or {}:
        sub_config = getattr(config, key, None)
        if sub_config is not None:
            asked = requested.get(key) if isinstance(requested, dict) else requested
            found += _sinkhorn_configs(sub_config, asked)
    return found


def _verify_sinkhorn_runs(model: PreTrainedModel, requested: object) -> None:
    """After loading (or switching), every part asked for sinkhorn must have it (its config, and every module
    holding a config of the same model type: a tower may hold a copy), and no causal attention module may run it
    (Whisper's decoder, also when a saved config brings sinkhorn: refused here rather than at its first forward)."""
    holders = [module for module in model.modules() if isinstance(getattr(module, "config", None), PreTrainedConfig)]
    asked = _sinkhorn_configs(model.config, requested)
    asked_types = {config.model_type for config in asked}
    configs = asked + [module.config for module in holders if module.config.model_type in asked_types]
    missed = [config for config in configs if compat.config_attn_implementation(config) != ATTN_IMPLEMENTATION]
    if missed:
        check_supported(missed[0], type(model).__name__)  # a refused family: say why
        raise RuntimeError(
            f"attn_implementation={requested!r} asked for sinkhorn, yet {type(model).__name__}'s "
            f"{missed[0].model_type} config runs {compat.config_attn_implementation(missed[0])!r}: sinkhorn would "
            "silently not run there."
        )
    for module in holders:
        if getattr(module, "is_causal", False) is True and compat.config_attn_implementation(module.config) == (
            ATTN_IMPLEMENTATION
        ):
            _refuse_causal(module, True)


def _persist_attn_implementation(config: PreTrainedConfig, output: dict) -> None:
    """Write ``attn_implementation: "sinkhorn"`` into saved configs: transformers drops the key on save, and a
    fine-tuned Sinkformer would otherwise reload as SDPA without a word."""
    if compat.config_attn_implementation(config) == ATTN_IMPLEMENTATION:
        output["attn_implementation"] = ATTN_IMPLEMENTATION
        output[HINT_KEY] = HINT
    else:  # a Sinkhorn checkpoint switched back to another attention
        output.pop(HINT_KEY, None)


def _settings_into_given_config(kwargs: dict) -> None:
    """``from_pretrained(..., config=cfg, sinkhorn_iterations=K)``: transformers hands keyword arguments to the
    model's ``__init__`` (a TypeError) when ``config`` is an object, so set them on a copy of it (as transformers
    does itself for the config it loads). sentence-transformers passes ``config=`` this way."""
    config = kwargs.get("config")
    if not isinstance(config, PreTrainedConfig) or not any(name in kwargs for name in SETTING_ATTRIBUTES):
        return
    config = copy.deepcopy(config)
    for name in SETTING_ATTRIBUTES:
        if name in kwargs:
            setattr(config, name, kwargs.pop(name))
    kwargs["config"] = config


def register() -> None:
    """Register ``"sinkhorn"`` with transformers (attention + mask functions) and install the guards.

    Idempotent; called on ``import sinkhorn_hf``.
    """
    AttentionInterface.register(ATTN_IMPLEMENTATION, sinkhorn_attention_forward)
    # Without a registered mask function transformers passes attention_mask=None: padding would get mass.
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    compat.patch_attn_implementation_check(_check_sinkhorn_request)
    compat.patch_attn_implementation_request(_check_requested_keys, _verify_sinkhorn_runs)
    # class-level defaults make from_pretrained(..., sinkhorn_iterations=5) land in the config
    compat.set_config_class_defaults(
        dict(zip(SETTING_ATTRIBUTES, dataclasses.astuple(SinkhornSettings()), strict=True))
    )
    compat.patch_config_to_dict(_persist_attn_implementation)
    compat.patch_from_pretrained_kwargs(_settings_into_given_config)
    compat.warm_output_collector()
