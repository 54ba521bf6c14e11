"""The one factory of tiny random models for the whole test suite: configs of every supported family, models with
inputs (padded for text), and a way to make attention peaked.

``tiny_config(model_type, layers, dropout, **extra)``: hidden size 16, 2 heads, feed-forward 32; text: vocabulary
99, 64 positions; images: 32×32 pixels in 8×8 patches (Swin: 4×4 patches, windows of 2). ``extra`` overrides any
config field. ``save_tiny_bert`` saves a somewhat wider BERT with its tokenizer as a Hub download leaves them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

from sinkhorn_hf.compat import model_from_config

TEXT = {
    "bert": ("BertConfig", "BertModel"),
    "roberta": ("RobertaConfig", "RobertaModel"),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaModel"),
    "camembert": ("CamembertConfig", "CamembertModel"),
    "electra": ("ElectraConfig", "ElectraModel"),
    "albert": ("AlbertConfig", "AlbertModel"),
    "distilbert": ("DistilBertConfig", "DistilBertModel"),
    "ernie": ("ErnieConfig", "ErnieModel"),
}
VISION = {
    "vit": ("ViTConfig", "ViTModel"),
    "deit": ("DeiTConfig", "DeiTModel"),
    "beit": ("BeitConfig", "BeitModel"),
    "dinov2": ("Dinov2Config", "Dinov2Model"),
    "vit_mae": ("ViTMAEConfig", "ViTMAEModel"),
    "swin": ("SwinConfig", "SwinModel"),
    "clip_vision_model": ("CLIPVisionConfig", "CLIPVisionModel"),
    "siglip_vision_model": ("SiglipVisionConfig", "SiglipVisionModel"),
}
ALL_FAMILIES = list(TEXT) + list(VISION)
LENGTHS = (7, 4, 9)  # the padded text batch


@dataclass
class Tiny:
    model: torch.nn.Module
    inputs: dict[str, torch.Tensor]
    valid: torch.Tensor | None  # (B, N) bool for padded text batches


def _dropout_fields(model_type: str, dropout: float) -> dict[str, float]:
    """Every dropout (and stochastic depth) probability of the family's config, set to ``dropout``."""
    if model_type == "distilbert":
        return dict(dropout=dropout, attention_dropout=dropout)
    if model_type in ("clip_vision_model", "siglip_vision_model"):
        return dict(attention_dropout=dropout)
    fields = dict(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    if model_type in ("dinov2", "beit", "swin"):
        fields["drop_path_rate"] = dropout
    return fields


def tiny_config(model_type: str, layers: int = 2, dropout: float = 0.0, **extra: Any) -> transformers.PreTrainedConfig:
    """A tiny config of ``model_type`` with ``layers`` layers (Swin: stages of one block) and every dropout set to
    ``dropout``; ``extra`` overrides any field (e.g. ``image_size=16, patch_size=4``, ``num_labels=2``)."""
    config_name, _ = TEXT.get(model_type) or VISION[model_type]
    fields: dict[str, Any] = _dropout_fields(model_type, dropout)
    if model_type == "distilbert":
        fields.update(dim=16, hidden_dim=32, n_layers=layers, n_heads=2)
    elif model_type == "swin":
        fields.update(embed_dim=8, depths=[1] * layers, num_heads=[2] * layers, window_size=2)
    else:
        fields.update(hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2)
    if model_type in TEXT:
        fields.update(vocab_size=99, max_position_embeddings=64)
    else:
        fields.update(image_size=32, patch_size=4 if model_type == "swin" else 8, num_channels=3)
    if model_type == "albert":
        fields.update(embedding_size=8)
    if model_type == "beit":
        fields.update(use_relative_position_bias=True)
    if model_type == "vit_mae":
        fields.update(mask_ratio=0.0)
    fields.update(extra)
    return getattr(transformers, config_name)(**fields)


def save_tiny_bert(
    directory: Path,
    tokenizer: Any,
    model_name: str = "BertModel",
    seed: int = 0,
    max_shard_size: str | None = None,
    **extra: Any,
) -> Path:
    """A random 2-layer BERT ``model_name`` (hidden size 32, 4 heads, feed-forward 64; BertConfig's dropout 0.1)
    over ``tokenizer``'s vocabulary, saved with the tokenizer in ``directory`` (``extra``: see tiny_config)."""
    torch.manual_seed(seed)
    config = tiny_config(
        "bert",
        dropout=0.1,
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        **extra,
    )
    model = getattr(transformers, model_name)(config)
    model.save_pretrained(directory, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tokenizer.save_pretrained(directory)
    return directory


def make_tiny(model_type: str, attn_implementation: str = "eager", seed: int = 0, **config: Any) -> Tiny:
    """A tiny random base model of ``model_type`` in eval mode with its inputs (``config``: see tiny_config)."""
    torch.manual_seed(seed)
    _, model_name = TEXT.get(model_type) or VISION[model_type]
    model_class = getattr(transformers, model_name)
    model = model_from_config(model_class, tiny_config(model_type, **config), attn_implementation=attn_implementation)
    model.eval()
    generator = torch.Generator().manual_seed(seed + 1)
    if model_type in TEXT:
        n = max(LENGTHS)
        valid = torch.arange(n)[None] < torch.tensor(LENGTHS)[:, None]
        input_ids = torch.randint(3, 99, (len(LENGTHS), n), generator=generator) * valid
        return Tiny(model, {"input_ids": input_ids, "attention_mask": valid.long()}, valid)
    inputs = {"pixel_values": torch.randn(2, 3, 32, 32, generator=generator)}
    if model_type == "vit_mae":  # fixed patch order: MAE shuffles patches with random noise otherwise
        inputs["noise"] = torch.arange(16, dtype=torch.float).expand(2, 16)
    return Tiny(model, inputs, None)


def sharpen(tiny: Tiny, factor: float = 30.0) -> Tiny:
    """Scale BERT query weights so attention is far from uniform (random init gives near-uniform rows)."""
    with torch.no_grad():
        for layer in tiny.model.encoder.layer:
            layer.attention.self.query.weight.mul_(factor)
    return tiny
