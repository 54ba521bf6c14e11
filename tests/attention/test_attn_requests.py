"""attn_implementation as a dict keyed by sub-config names: sinkhorn runs where it was asked for, or the request
is refused naming the valid keys (transformers ignores keys it does not know, and would run SDPA without a word)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from tiny_models import tiny_config

import sinkhorn_hf
from sinkhorn_hf.compat import config_attn_implementation, model_from_config

_TOWER = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
_TEXT = dict(_TOWER, vocab_size=99, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _composite(name: str):
    """A tiny composite (text + vision) model's class, config and inputs."""
    ids = torch.randint(3, 99, (2, 5), generator=torch.Generator().manual_seed(0))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    if name == "Siglip2Model":
        config = transformers.Siglip2Config(text_config=_TEXT, vision_config=dict(_TOWER, patch_size=8, num_patches=16))
        patches = images.unfold(2, 8, 8).unfold(3, 8, 8).permute(0, 2, 3, 1, 4, 5).reshape(2, 16, 192)
        pixels = dict(
            pixel_values=patches, pixel_attention_mask=torch.ones(2, 16), spatial_shapes=torch.tensor([[4, 4]] * 2)
        )
    elif name == "SiglipModel":
        config = transformers.SiglipConfig(text_config=_TEXT, vision_config=dict(_TOWER, image_size=32, patch_size=8))
        pixels = dict(pixel_values=images)
    else:
        config = transformers.CLIPConfig(
            text_config=dict(_TEXT, projection_dim=8),
            vision_config=dict(_TOWER, image_size=32, patch_size=8, projection_dim=8),
            projection_dim=8,
        )
        pixels = dict(pixel_values=images)
    return getattr(transformers, name), config, dict(input_ids=ids, **pixels)


@pytest.mark.parametrize("name", ["CLIPModel", "SiglipModel", "Siglip2Model"])
@torch.no_grad()
def test_vision_tower_runs_sinkhorn_where_asked(name):
    model_class, config, inputs = _composite(name)
    torch.manual_seed(0)
    model = model_from_config(model_class, config, attn_implementation={"vision_config": "sinkhorn"}).eval()
    assert config_attn_implementation(model.config.vision_config) == "sinkhorn"
    assert config_attn_implementation(model.config.text_config) != "sinkhorn"
    embeds = []
    for iterations in (1, 3):
        model.config.vision_config.sinkhorn_iterations = iterations
        embeds.append(model(**inputs).image_embeds)
    assert (embeds[0] - embeds[1]).abs().max() > 1e-4, "K=3 equals K=1: sinkhorn does not run in the vision tower"


@pytest.mark.parametrize(
    "name, requested, valid",
    [
        ("CLIPModel", {"vision": "sinkhorn"}, "'vision_config', 'text_config'"),
        ("SiglipModel", {"vision": "sinkhorn", "text_config": "sdpa"}, "'vision_config', 'text_config'"),
        ("Siglip2Model", {"vision_config": {"encoder": "sinkhorn"}}, "the model itself\\)\\;"),
    ],
)
def test_unknown_keys_asking_for_sinkhorn_are_refused(name, requested, valid):
    model_class, config, _ = _composite(name)
    with pytest.raises(ValueError, match="transformers would ignore it.*Valid keys: '' \\(the model itself\\)"):
        model_from_config(model_class, copy.deepcopy(config), attn_implementation=requested)
    model = model_from_config(model_class, config, attn_implementation="sdpa")
    with pytest.raises(ValueError, match=valid):
        model.set_attn_implementation(requested)
    assert config_attn_implementation(model.config.vision_config) == "sdpa"


def test_whisper_encoder_key_is_refused_naming_the_encoder_only_class(tmp_path):
    with pytest.raises(ValueError, match="'encoder', which WhisperConfig does not have.*WhisperForAudioClassification"):
        model_from_config(
            transformers.WhisperModel, tiny_config("whisper"), attn_implementation={"encoder": "sinkhorn"}
        )
    model_from_config(transformers.WhisperModel, tiny_config("whisper"), attn_implementation="sdpa").save_pretrained(
        tmp_path
    )
    with pytest.raises(ValueError, match="'encoder', which WhisperConfig does not have"):
        transformers.WhisperModel.from_pretrained(tmp_path, attn_implementation={"encoder": "sinkhorn"})


@pytest.mark.parametrize("name", ["WhisperModel", "WhisperForConditionalGeneration"])
def test_whisper_decoder_is_refused_as_causal_at_load(name):
    with pytest.raises(sinkhorn_hf.CausalSinkhornError, match="WhisperAttention is causal"):
        model_from_config(getattr(transformers, name), tiny_config("whisper"), attn_implementation="sinkhorn")


def test_whisper_decoder_loaded_from_a_sinkhorn_encoder_checkpoint_is_refused(tmp_path):
    model_from_config(
        transformers.WhisperForAudioClassification, tiny_config("whisper"), attn_implementation="sinkhorn"
    ).save_pretrained(tmp_path)
    with pytest.raises(sinkhorn_hf.CausalSinkhornError, match="WhisperAttention is causal"):
        transformers.WhisperModel.from_pretrained(tmp_path)


def test_loading_info_is_returned_and_the_model_checked(tmp_path):
    model_from_config(transformers.WhisperModel, tiny_config("whisper"), attn_implementation="sdpa").save_pretrained(
        tmp_path
    )
    model, info = transformers.WhisperForAudioClassification.from_pretrained(
        tmp_path, attn_implementation="sinkhorn", output_loading_info=True
    )
    assert config_attn_implementation(model.config) == "sinkhorn" and "missing_keys" in info
    with pytest.raises(sinkhorn_hf.CausalSinkhornError):
        transformers.WhisperModel.from_pretrained(tmp_path, attn_implementation="sinkhorn", output_loading_info=True)


def test_a_tower_holding_another_config_is_caught():
    model_class, config, _ = _composite("SiglipModel")
    model = model_from_config(model_class, config, attn_implementation="sdpa")
    model.vision_model.config = copy.deepcopy(model.config.vision_config)  # the tower no longer reads the sub-config
    with pytest.raises(RuntimeError, match="siglip_vision_model config runs 'sdpa'.*silently not run"):
        model.set_attn_implementation({"vision_config": "sinkhorn"})


def test_dicts_without_sinkhorn_are_left_to_transformers():
    model_class, config, _ = _composite("CLIPModel")
    model = model_from_config(model_class, config, attn_implementation={"vision": "eager"})
    assert config_attn_implementation(model.config.vision_config) != "sinkhorn"
