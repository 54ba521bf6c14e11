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
    "modernbert": ("ModernBertConfig", "ModernBertModel"),
    "nomic_bert": ("NomicBertConfig", "NomicBertModel"),
    "gte": ("GteConfig", "GteModel"),
    "eurobert": ("EuroBertConfig", "EuroBertModel"),
    "xlm-roberta-xl": ("XLMRobertaXLConfig", "XLMRobertaXLModel"),
    "data2vec-text": ("Data2VecTextConfig", "Data2VecTextModel"),
    "esm": ("EsmConfig", "EsmModel"),
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
    "vit_msn": ("ViTMSNConfig", "ViTMSNModel"),
    "ijepa": ("IJepaConfig", "IJepaModel"),
    "dinov3_vit": ("DINOv3ViTConfig", "DINOv3ViTModel"),
    "siglip2_vision_model": ("Siglip2VisionConfig", "Siglip2VisionModel"),
    "videomae": ("VideoMAEConfig", "VideoMAEModel"),
}
AUDIO = {
    "wav2vec2": ("Wav2Vec2Config", "Wav2Vec2Model"),
    "hubert": ("HubertConfig", "HubertModel"),
    "whisper": ("WhisperConfig", "WhisperForAudioClassification"),  # the encoder tower only
    "audio-spectrogram-transformer": ("ASTConfig", "ASTModel"),
}
FAMILIES = {**TEXT, **VISION, **AUDIO}
# The families of the BERT/ViT generation (served since the first release) and the newer encoders.
CLASSIC_FAMILIES = [*list(TEXT)[:8], *list(VISION)[:8]]
NEW_FAMILIES = [family for family in FAMILIES if family not in CLASSIC_FAMILIES]
LENGTHS = (7, 4, 9)  # the padded text batch
PEAKED = dict(initializer_range=0.3)  # config fields giving attention far from uniform (random init is near it)


@dataclass
class Tiny:
    model: torch.nn.Module
    inputs: dict[str, torch.Tensor]
    valid: torch.Tensor | None  # (B, N) bool over the attention's tokens for padded batches (text, audio frames)


# Families whose inputs carry a padding mask that reaches the attention (the others have fixed-size inputs).
PADDED = (*TEXT, "wav2vec2", "hubert", "siglip2_vision_model")
AUDIO_SAMPLES = (200, 120, 160)  # the padded raw-audio batch (wav2vec2, HuBERT)
SIGLIP2_PATCHES = (16, 9, 12)  # the padded patch batch (SigLIP2's variable resolution)


def _dropout_fields(model_type: str, dropout: float) -> dict[str, float]:
    """Every dropout (and stochastic depth) probability of the family's config, set to ``dropout``."""
    if model_type == "distilbert":
        return dict(dropout=dropout, attention_dropout=dropout)
    if model_type in ("clip_vision_model", "siglip_vision_model", "siglip2_vision_model", "eurobert"):
        return dict(attention_dropout=dropout)
    if model_type == "modernbert":
        return dict(attention_dropout=dropout, embedding_dropout=dropout, mlp_dropout=dropout)
    if model_type == "dinov3_vit":
        return dict(attention_dropout=dropout, drop_path_rate=dropout)
    if model_type in ("wav2vec2", "hubert"):
        return dict(
            hidden_dropout=dropout, attention_dropout=dropout, activation_dropout=dropout, feat_proj_dropout=dropout
        )
    if model_type == "whisper":
        return dict(dropout=dropout, attention_dropout=dropout, activation_dropout=dropout)
    fields = dict(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    if model_type in ("dinov2", "beit", "swin"):
        fields["drop_path_rate"] = dropout
    return fields


def _shape_fields(model_type: str, layers: int) -> dict[str, Any]:
    """Tiny sizes in the family's own field names, with what the family needs to run on tiny inputs."""
    if model_type == "distilbert":
        return dict(dim=16, hidden_dim=32, n_layers=layers, n_heads=2)
    if model_type == "swin":
        return dict(embed_dim=8, depths=[1] * layers, num_heads=[2] * layers, window_size=2)
    if model_type == "whisper":  # 16 input frames -> 8 encoder positions
        return dict(
            d_model=16,
            encoder_layers=layers,
            encoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_layers=1,
            decoder_attention_heads=2,
            decoder_ffn_dim=32,
            num_mel_bins=8,
            max_source_positions=8,
            max_target_positions=16,
            vocab_size=99,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=1,
        )
    fields: dict[str, Any] = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2)
    if model_type in TEXT:
        fields.update(vocab_size=99, max_position_embeddings=64, pad_token_id=0)
    elif model_type in ("wav2vec2", "hubert"):  # raw audio -> frames: kernel 10 stride 5, then kernel 4 stride 4
        fields.update(
            conv_dim=(8, 8),
            conv_stride=(5, 4),
            conv_kernel=(10, 4),
            num_feat_extract_layers=2,
            num_conv_pos_embeddings=4,
            num_conv_pos_embedding_groups=2,
            feat_extract_norm="layer",
            do_stable_layer_norm=True,
            layerdrop=0.0,
            mask_time_prob=0.0,
            vocab_size=99,
        )
    elif model_type == "audio-spectrogram-transformer":  # (16 frames, 16 mel bins) -> 16 patches + 2 tokens
        fields.update(patch_size=4, frequency_stride=4, time_stride=4, max_length=16, num_mel_bins=16)
    elif model_type == "siglip2_vision_model":
        fields.update(patch_size=8, num_patches=16, num_channels=3)
    else:
        fields.update(image_size=32, patch_size=4 if model_type == "swin" else 8, num_channels=3)
    extra = {
        "albert": dict(embedding_size=8),
        "beit": dict(use_relative_position_bias=True),
        "vit_mae": dict(mask_ratio=0.0),
        "modernbert": dict(local_attention=4, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2),
        "eurobert": dict(num_key_value_heads=1, head_dim=8, bos_token_id=1, eos_token_id=2, mask_token_id=3),
        "nomic_bert": dict(head_dim=8),
        "esm": dict(position_embedding_type="rotary", mask_token_id=3, emb_layer_norm_before=False),
        "dinov3_vit": dict(num_register_tokens=2, layerscale_value=0.5),
        "videomae": dict(num_frames=2, tubelet_size=2),
    }
    fields.update(extra.get(model_type, {}))
    return fields


def tiny_config(model_type: str, layers: int = 2, dropout: float = 0.0, **extra: Any) -> transformers.PreTrainedConfig:
    """A tiny config of ``model_type`` with ``layers`` layers (Swin: stages of one block) and every dropout set to
    ``dropout``; ``extra`` overrides any field (e.g. ``image_size=16, patch_size=4``, ``num_labels=2``)."""
    config_name, _ = FAMILIES[model_type]
    fields = {**_dropout_fields(model_type, dropout), **_shape_fields(model_type, layers), **extra}
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
    """A tiny random model of ``model_type`` in eval mode with its inputs (``config``: see tiny_config)."""
    torch.manual_seed(seed)
    model_class = getattr(transformers, FAMILIES[model_type][1])
    model = model_from_config(model_class, tiny_config(model_type, **config), attn_implementation=attn_implementation)
    model.eval()
    return Tiny(model, *tiny_inputs(model, torch.Generator().manual_seed(seed + 1)))


def tiny_inputs(
    model: torch.nn.Module, generator: torch.Generator
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """A batch for a tiny ``model`` (padded where the family takes a padding mask) and its valid tokens (or None)."""
    model_type = model.config.model_type
    if model_type in TEXT:
        valid = _lengths_mask(LENGTHS)
        input_ids = torch.randint(3, 99, valid.shape, generator=generator) * valid
        return {"input_ids": input_ids, "attention_mask": valid.long()}, valid
    if model_type in ("wav2vec2", "hubert"):
        samples = _lengths_mask(AUDIO_SAMPLES)
        audio = torch.randn(samples.shape, generator=generator) * samples
        frames = model._get_feature_vector_attention_mask(
            model._get_feat_extract_output_lengths(samples.sum(-1)).max(), samples.long()
        )
        return {"input_values": audio, "attention_mask": samples.long()}, frames
    if model_type == "siglip2_vision_model":
        valid = _lengths_mask(SIGLIP2_PATCHES)
        patches = torch.randn(*valid.shape, 3 * 8 * 8, generator=generator) * valid[..., None]
        shapes = torch.tensor([[4, 4], [3, 3], [3, 4]])
        return {"pixel_values": patches, "pixel_attention_mask": valid.long(), "spatial_shapes": shapes}, valid
    if model_type == "whisper":
        return {"input_features": torch.randn(2, 8, 16, generator=generator)}, None
    if model_type == "audio-spectrogram-transformer":
        return {"input_values": torch.randn(2, 16, 16, generator=generator)}, None
    if model_type == "videomae":
        return {"pixel_values": torch.randn(2, 2, 3, 32, 32, generator=generator)}, None
    inputs = {"pixel_values": torch.randn(2, 3, 32, 32, generator=generator)}
    if model_type == "vit_mae":  # fixed patch order: MAE shuffles patches with random noise otherwise
        inputs["noise"] = torch.arange(16, dtype=torch.float).expand(2, 16)
    return inputs, None


def _lengths_mask(lengths: tuple[int, ...]) -> torch.Tensor:
    return torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]


def last_hidden_state(tiny: Tiny, **forward: Any) -> torch.Tensor:
    """The encoder's last hidden state (B, N, H) on the tiny batch (``forward``: extra forward arguments)."""
    out = tiny.model(**tiny.inputs, **forward, output_hidden_states=True)
    return out.last_hidden_state if getattr(out, "last_hidden_state", None) is not None else out.hidden_states[-1]


def sharpen(tiny: Tiny, factor: float = 30.0) -> Tiny:
    """Scale BERT query weights so attention is far from uniform (random init gives near-uniform rows)."""
    with torch.no_grad():
        for layer in tiny.model.encoder.layer:
            layer.attention.self.query.weight.mul_(factor)
    return tiny


def alone(tiny: Tiny, b: int) -> tuple[dict[str, torch.Tensor], int]:
    """Sample ``b`` of a padded tiny batch without its padding, and how many valid tokens it has."""
    count = int(tiny.valid[b].sum())
    mask_name = "pixel_attention_mask" if "pixel_attention_mask" in tiny.inputs else "attention_mask"
    length = int(tiny.inputs[mask_name][b].sum())  # in the input's own unit: tokens, audio samples or patches
    inputs = {name: tensor[b : b + 1] for name, tensor in tiny.inputs.items()}
    for name in ("input_ids", "input_values", "pixel_values", mask_name):
        if name in inputs:
            inputs[name] = inputs[name][:, :length]
    return inputs, count
