"""The encoder families sinkhorn_hf serves, keyed by transformers ``model_type``, and the rule that admits them.

A model type is served when three things hold for it, each checked per family by
tests/attention/test_family_rule.py on a tiny model with a padded batch (not assumed from the name):

1. its attention layers call transformers' AttentionInterface (one call of the registered function per layer);
2. they are bidirectional (no call is causal);
3. its padding mask reaches transformers' mask interface, so the attention function receives the padded keys
   (and, for ModernBERT's local layers, the sliding-window band) as its mask.

Types whose attention is computed inside their own modules are refused with that reason; any other type is
refused as not validated, rather than with a guess.
"""

from __future__ import annotations

from typing import Any

TEXT_FAMILIES = (
    "bert",
    "roberta",
    "xlm-roberta",
    "camembert",
    "electra",
    "albert",
    "distilbert",
    "ernie",
    "modernbert",
    "nomic_bert",
    "gte",
    "eurobert",
    "xlm-roberta-xl",
    "data2vec-text",
    "esm",
)
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
    "vit_msn",
    "ijepa",
    "dinov3_vit",
    "siglip2",
    "siglip2_vision_model",
    "videomae",
)
# whisper: the encoder tower (WhisperForAudioClassification); a decoder is refused as causal at its first forward.
AUDIO_FAMILIES = ("wav2vec2", "hubert", "whisper", "audio-spectrogram-transformer")
SUPPORTED_FAMILIES = TEXT_FAMILIES + VISION_FAMILIES + AUDIO_FAMILIES

# model_type -> why Sinkhorn cannot run there (its attention never reaches the AttentionInterface).
_OWN_ATTENTION = "computes its attention inside its own modules, without transformers' AttentionInterface"
REFUSED_FAMILIES = {
    "mpnet": f"MPNet {_OWN_ATTENTION} (relative position bias added in MPNetAttention)",
    "deberta": f"DeBERTa {_OWN_ATTENTION} (disentangled content/position attention)",
    "deberta-v2": f"DeBERTa-v2 {_OWN_ATTENTION} (disentangled content/position attention)",
    "longformer": f"Longformer {_OWN_ATTENTION} (chunked sliding-window and global attention)",
    "hiera": f"Hiera {_OWN_ATTENTION} (mask-unit attention)",
}


class UnsupportedModelError(ValueError):
    """A model type sinkhorn_hf does not serve: refused for a stated reason, or not validated."""


def check_supported(config: Any, class_name: str | None = None) -> str:
    """Return ``config.model_type`` or raise :class:`UnsupportedModelError` saying why it is not served."""
    model_type = getattr(config, "model_type", None)
    what = f"{class_name} (model_type={model_type!r})" if class_name else f"model_type={model_type!r}"
    if model_type in REFUSED_FAMILIES:
        raise UnsupportedModelError(
            f"sinkhorn_hf cannot serve {what}: {REFUSED_FAMILIES[model_type]}, so Sinkhorn attention would not run."
        )
    if model_type not in SUPPORTED_FAMILIES:
        raise UnsupportedModelError(
            f"{what} is not validated with sinkhorn_hf (its attention layers, causality and padding mask have not "
            f"been checked). Supported model types: {', '.join(SUPPORTED_FAMILIES)}. For a composite model, name "
            'the towers, e.g. attn_implementation={"vision_config": "sinkhorn", "text_config": "sdpa"}.'
        )
    return model_type
