"""Tiny random models of every supported family, with inputs (padded for text models)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import transformers

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
LENGTHS = (7, 4, 9)


@dataclass
class Tiny:
    model: torch.nn.Module
    inputs: dict[str, torch.Tensor]
    valid: torch.Tensor | None  # (B, N) bool for padded text batches


def _config(model_type: str):
    name, _ = TEXT.get(model_type) or VISION[model_type]
    cls = getattr(transformers, name)
    if model_type in TEXT:
        kwargs = dict(vocab_size=99, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64)
        if model_type == "distilbert":
            return cls(dim=16, hidden_dim=32, n_layers=2, n_heads=2, vocab_size=99, max_position_embeddings=64)
        if model_type == "albert":
            kwargs["embedding_size"] = 8
        return cls(hidden_size=16, intermediate_size=32, **kwargs)
    common = dict(image_size=32, patch_size=8, num_channels=3)
    if model_type == "swin":
        return cls(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[2, 2], window_size=2)
    kwargs = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, **common)
    if model_type == "beit":
        kwargs["use_relative_position_bias"] = True
    if model_type == "vit_mae":
        kwargs["mask_ratio"] = 0.0
    return cls(**kwargs)


def make_tiny(model_type: str, attn_implementation: str = "eager", seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    _, model_name = TEXT.get(model_type) or VISION[model_type]
    model = getattr(transformers, model_name)._from_config(_config(model_type), attn_implementation=attn_implementation)
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


ALL_FAMILIES = list(TEXT) + list(VISION)


@pytest.fixture(params=ALL_FAMILIES)
def family(request) -> str:
    return request.param
