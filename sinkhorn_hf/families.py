"""The encoder families sinkhorn_hf supports, keyed by transformers ``model_type``."""

from __future__ import annotations

from typing import Any

TEXT_FAMILIES = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "albert", "distilbert", "ernie")
VISION_FAMILIES = (
    "vit",
    "deit",
    "beit",
    "dinov2",
    "vit_mae",
    "swin",
    "clip",
    "clip_vision_model",
    "siglip",
    "siglip_vision_model",
)
SUPPORTED_FAMILIES = TEXT_FAMILIES + VISION_FAMILIES


class UnsupportedModelError(ValueError):
    """A model family sinkhorn_hf cannot serve (its attention does not route through the interface)."""


def check_supported(config: Any, class_name: str | None = None) -> str:
    """Return ``config.model_type`` or raise :class:`UnsupportedModelError` naming what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        what = f"{class_name} (model_type={model_type!r})" if class_name else f"model_type={model_type!r}"
        raise UnsupportedModelError(
            f"sinkhorn_hf does not support {what}: its attention does not go through transformers' "
            f"AttentionInterface as a bidirectional encoder. Supported model types: {', '.join(SUPPORTED_FAMILIES)}. "
            "For a composite model, name the towers, e.g. "
            'attn_implementation={"vision_config": "sinkhorn", "text_config": "sdpa"}.'
        )
    return model_type
