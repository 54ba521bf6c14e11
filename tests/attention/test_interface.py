"""Registration, config flags and their persistence, refusals, and the masks transformers hands over."""

import copy
import json

import pytest
import torch
import transformers
from tiny_models import make_tiny, sharpen

import sinkhorn_hf
from sinkhorn_hf.attention import support_from_mask


def test_config_round_trip_reloads_as_sinkhorn(tmp_path):
    tiny = make_tiny("bert", "sinkhorn")
    tiny.model.config.sinkhorn_iterations = 5
    tiny.model.config.sinkhorn_tolerance = 1e-3
    tiny.model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["attn_implementation"] == "sinkhorn"
    assert saved["sinkhorn_iterations"] == 5 and saved["sinkhorn_tolerance"] == 1e-3
    reloaded = transformers.AutoModel.from_pretrained(tmp_path).eval()
    assert reloaded.config._attn_implementation == "sinkhorn"
    assert reloaded.config.sinkhorn_iterations == 5
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(**tiny.inputs).last_hidden_state, tiny.model(**tiny.inputs).last_hidden_state
        )


def test_sdpa_model_saves_no_sinkhorn_key(tmp_path):
    make_tiny("bert", "sdpa").model.save_pretrained(tmp_path)
    assert "attn_implementation" not in json.loads((tmp_path / "config.json").read_text())
    assert transformers.AutoModel.from_pretrained(tmp_path).config._attn_implementation == "sdpa"


def test_from_pretrained_kwargs_set_iterations(tmp_path):
    make_tiny("bert", "sdpa").model.save_pretrained(tmp_path)
    model = transformers.AutoModel.from_pretrained(tmp_path, attn_implementation="sinkhorn", sinkhorn_iterations=7)
    assert model.config._attn_implementation == "sinkhorn" and model.config.sinkhorn_iterations == 7


@pytest.mark.parametrize(
    "bad", [{"sinkhorn_iterations": 0}, {"sinkhorn_iterations": 2.5}, {"sinkhorn_tolerance": -1.0}]
)
def test_bad_settings_fail_at_load(tmp_path, bad):
    make_tiny("bert", "sdpa").model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="sinkhorn_(iterations|tolerance) must be"):
        transformers.AutoModel.from_pretrained(tmp_path, attn_implementation="sinkhorn", **bad)


def test_bad_settings_set_later_fail_at_forward():
    tiny = make_tiny("vit", "sinkhorn")
    tiny.model.config.sinkhorn_iterations = -3
    with pytest.raises(ValueError, match="sinkhorn_iterations must be an int >= 1"):
        tiny.model(**tiny.inputs)


def test_causal_module_is_refused_at_forward():
    tiny = make_tiny("bert", "sinkhorn")
    tiny.model.encoder.layer[1].attention.self.is_causal = True
    with pytest.raises(sinkhorn_hf.CausalSinkhornError, match="BertSelfAttention is causal"):
        tiny.model(**tiny.inputs)


def test_set_attn_implementation_back_and_forth():
    tiny = sharpen(make_tiny("bert", "sdpa"))
    with torch.no_grad():
        softmax = tiny.model(**tiny.inputs).last_hidden_state
        tiny.model.set_attn_implementation("sinkhorn")
        sinkhorn = tiny.model(**tiny.inputs).last_hidden_state
        tiny.model.set_attn_implementation("sdpa")
        again = tiny.model(**tiny.inputs).last_hidden_state
    assert not torch.allclose(softmax[tiny.valid], sinkhorn[tiny.valid], atol=1e-4)
    torch.testing.assert_close(again, softmax)


def _tiny_config(name, **kwargs):
    return getattr(transformers, name)(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=99, **kwargs
    )


@pytest.mark.parametrize(
    "config_name, model_name", [("DebertaV2Config", "DebertaV2Model"), ("MPNetConfig", "MPNetModel")]
)
def test_unsupported_family_is_refused(config_name, model_name):
    with pytest.raises(sinkhorn_hf.UnsupportedModelError, match="Supported model types: bert"):
        getattr(transformers, model_name)._from_config(_tiny_config(config_name), attn_implementation="sinkhorn")


def test_switching_an_unsupported_family_never_claims_sinkhorn():
    # transformers itself refuses (with a warning) to switch models that bypass the interface
    model = transformers.DebertaV2Model._from_config(_tiny_config("DebertaV2Config"))
    model.set_attn_implementation("sinkhorn")
    assert model.config._attn_implementation != "sinkhorn"


def test_decoder_is_refused():
    with pytest.raises(sinkhorn_hf.CausalSinkhornError, match="future tokens"):
        transformers.BertModel._from_config(_tiny_config("BertConfig", is_decoder=True), attn_implementation="sinkhorn")


def test_causal_text_tower_is_refused_and_dict_form_works():
    config = transformers.CLIPConfig(
        text_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=99,
            projection_dim=8,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            projection_dim=8,
        ),
        projection_dim=8,
    )
    inputs = dict(input_ids=torch.randint(0, 99, (2, 5)), pixel_values=torch.randn(2, 3, 32, 32))
    with pytest.raises(sinkhorn_hf.UnsupportedModelError, match="clip_text_model.*text_config"):
        transformers.CLIPModel._from_config(copy.deepcopy(config), attn_implementation="sinkhorn")
    mixed = transformers.CLIPModel._from_config(
        copy.deepcopy(config), attn_implementation={"text_config": "sdpa", "vision_config": "sinkhorn"}
    )
    assert mixed.config.vision_config._attn_implementation == "sinkhorn"
    assert torch.isfinite(mixed(**inputs).logits_per_image).all()


def test_output_attentions_returns_sinkhorn_matrices():
    tiny = sharpen(make_tiny("bert", "sinkhorn"))
    tiny.model.config.sinkhorn_iterations = 2  # ends on a column step: columns exact, rows not
    attentions = tiny.model(**tiny.inputs, output_attentions=True).attentions
    assert len(attentions) == 2
    first = attentions[0][0, :, :7, :7]
    torch.testing.assert_close(first.sum(-2), torch.ones(2, 7), atol=1e-5, rtol=0)
    assert (first.sum(-1) - 1).abs().max() > 1e-3


# --- masks as they arrive -------------------------------------------------------------------------------------


def test_float_mask_is_bias_with_dtype_min_as_masked():
    bias = torch.randn(1, 1, 3, 3)
    bias[..., 2] = torch.finfo(torch.float16).min
    support = support_from_mask(bias.half(), 3, 3, torch.device("cpu"))
    assert support.allowed[..., :2].all() and not support.allowed[..., 2].any()
    torch.testing.assert_close(support.bias[..., :2], bias[..., :2].half().float())
    assert torch.all(support.bias[..., 2] == 0), "masked entries must not carry -65504 into the scores"
    assert support.query_valid.squeeze(-1).tolist() == [[[True, True, False]]]


def test_no_mask_means_everything_valid():
    support = support_from_mask(None, 4, 4, torch.device("cpu"))
    assert support.allowed.all() and support.query_valid.all() and support.bias is None


@pytest.mark.parametrize(
    "mask, message",
    [
        (torch.ones(2, 3, dtype=torch.bool), "4D attention mask"),
        (torch.ones(1, 1, 3, 3, dtype=torch.long), "bool .* or a float"),
    ],
)
def test_bad_masks_are_refused(mask, message):
    with pytest.raises(ValueError, match=message):
        support_from_mask(mask, 3, 3, torch.device("cpu"))


def test_user_4d_bool_mask_passes_through():
    tiny = make_tiny("bert", "sinkhorn")
    n = tiny.inputs["input_ids"].shape[1]
    block = torch.zeros(n, n, dtype=torch.bool)
    block[:3, :3] = True
    block[3:, 3:] = True  # two packed sequences
    mask = block.expand(3, 1, n, n)
    tiny.model.config.sinkhorn_iterations = 51
    attentions = tiny.model(tiny.inputs["input_ids"], attention_mask=mask, output_attentions=True).attentions
    attention = attentions[0]
    assert torch.all(attention[:, :, :3, 3:] == 0) and torch.all(attention[:, :, 3:, :3] == 0)
    torch.testing.assert_close(attention.sum(-2), torch.ones(3, 2, n), atol=1e-3, rtol=0)
