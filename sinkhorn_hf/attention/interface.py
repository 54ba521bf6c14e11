"""``attn_implementation="sinkhorn"``: the transformers attention function, its mask function, and the
guards that make the name safe to use (supported families only, persisted on save)."""

from __future__ import annotations

import dataclasses

from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedConfig, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .. import compat
from ..families import check_supported
from .masking import support_from_mask
from .routes import sinkhorn_attention
from .settings import SinkhornSettings

ATTN_IMPLEMENTATION = "sinkhorn"


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
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", False)
    if is_causal:
        raise CausalSinkhornError(
            f"{type(module).__name__} is causal, and sinkhorn attention cannot be: its column normalisation "
            "lets future tokens change the past. Use it on bidirectional encoders only (for a composite model, "
            'pass e.g. attn_implementation={"vision_config": "sinkhorn", "text_config": "sdpa"}).'
        )
    settings = SinkhornSettings.from_config(module.config)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    support = None
    if attention_mask is not None:  # without a mask, skip building an all-True (Lq, Lk) support
        support = support_from_mask(attention_mask, query.shape[-2], key.shape[-2], query.device)
    output, weights = sinkhorn_attention(
        query,
        key,
        value,
        allowed=None if support is None else support.allowed,
        bias=None if support is None else support.bias,
        query_valid=None if support is None else support.query_valid,
        scale=scaling,
        settings=settings,
        dropout=dropout if module.training else 0.0,
        return_weights=attentions_requested(kwargs),
    )
    output = output.transpose(1, 2).contiguous()
    return output, None if weights is None else weights.to(query.dtype)


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
    if not (type(model).is_backend_compatible() and compat.can_set_attn_implementation(type(model))):
        raise ValueError(
            f"{type(model).__name__} does not route its attention through transformers' AttentionInterface, "
            "so sinkhorn attention would not run."
        )
    if getattr(model.config, "is_decoder", False):
        raise CausalSinkhornError(
            f"{type(model).__name__} is configured as a decoder (is_decoder=True); sinkhorn attention is "
            "for bidirectional encoders only, as column normalisation leaks future tokens into the past."
        )
    SinkhornSettings.from_config(model.config)  # bad settings fail at load time, not at the first step


def _persist_attn_implementation(config: PreTrainedConfig, output: dict) -> None:
    """Write ``attn_implementation: "sinkhorn"`` into saved configs: transformers drops the key on save, and a
    fine-tuned Sinkformer would otherwise reload as SDPA without a word."""
    if compat.config_attn_implementation(config) == ATTN_IMPLEMENTATION:
        output["attn_implementation"] = ATTN_IMPLEMENTATION


def register() -> None:
    """Register ``"sinkhorn"`` with transformers (attention + mask functions) and install the guards.

    Idempotent; called on ``import sinkhorn_hf``.
    """
    AttentionInterface.register(ATTN_IMPLEMENTATION, sinkhorn_attention_forward)
    # Without a registered mask function transformers passes attention_mask=None: padding would get mass.
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    compat.patch_attn_implementation_check(_check_sinkhorn_request)
    # class-level defaults make from_pretrained(..., sinkhorn_iterations=5) land in the config
    compat.set_config_class_defaults(
        {f"sinkhorn_{name}": default for name, default in dataclasses.asdict(SinkhornSettings()).items()}
    )
    compat.patch_config_to_dict(_persist_attn_implementation)
