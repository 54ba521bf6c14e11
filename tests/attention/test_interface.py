"""Registration, config flags and their persistence, refusals, and the masks transformers hands over."""

import copy
import json
import subprocess
import sys

import pytest
import torch
import transformers
from tiny_models import make_tiny, sharpen

import sinkhorn_hf
from sinkhorn_hf.attention import support_from_mask
from sinkhorn_hf.compat import config_attn_implementation, model_from_config


def test_config_round_trip_reloads_as_sinkhorn(tmp_path):
    tiny = make_tiny("bert", "sinkhorn")
    tiny.model.config.sinkhorn_iterations = 5
    tiny.model.config.sinkhorn_tolerance = 1e-3
    tiny.model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["attn_implementation"] == "sinkhorn"
    assert saved["sinkhorn_iterations"] == 5 and saved["sinkhorn_tolerance"] == 1e-3
    reloaded = transformers.AutoModel.from_pretrained(tmp_path).eval()
    assert config_attn_implementation(reloaded.config) == "sinkhorn"
    assert reloaded.config.sinkhorn_iterations == 5
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(**tiny.inputs).last_hidden_state, tiny.model(**tiny.inputs).last_hidden_state
        )


def test_sdpa_model_saves_no_sinkhorn_key(tmp_path):
    make_tiny("bert", "sdpa").model.save_pretrained(tmp_path)
    assert "attn_implementation" not in json.loads((tmp_path / "config.json").read_text())
    assert config_attn_implementation(transformers.AutoModel.from_pretrained(tmp_path).config) == "sdpa"


def test_from_pretrained_kwargs_set_iterations(tmp_path):
    make_tiny("bert", "sdpa").model.save_pretrained(tmp_path)
    model = transformers.AutoModel.from_pretrained(tmp_path, attn_implementation="sinkhorn", sinkhorn_iterations=7)
    assert config_attn_implementation(model.config) == "sinkhorn" and model.config.sinkhorn_iterations == 7


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


def test_switching_an_unsupported_family_is_refused_with_the_reason():
    # transformers itself only warns and keeps SDPA for models that bypass the interface
    model = transformers.DebertaV2Model(_tiny_config("DebertaV2Config"))
    with pytest.raises(sinkhorn_hf.UnsupportedModelError, match="disentangled"):
        model.set_attn_implementation("sinkhorn")
    assert config_attn_implementation(model.config) != "sinkhorn"


def test_decoder_is_refused():
    with pytest.raises(sinkhorn_hf.CausalSinkhornError, match="future tokens"):
        model_from_config(
            transformers.BertModel, _tiny_config("BertConfig", is_decoder=True), attn_implementation="sinkhorn"
        )


def test_causal_text_tower_is_refused_and_dict_form_works():
    tower = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, projection_dim=8)
    config = transformers.CLIPConfig(
        text_config=dict(tower, vocab_size=99),
        vision_config=dict(tower, image_size=32, patch_size=8),
        projection_dim=8,
    )
    inputs = dict(input_ids=torch.randint(0, 99, (2, 5)), pixel_values=torch.randn(2, 3, 32, 32))
    with pytest.raises(sinkhorn_hf.UnsupportedModelError, match="clip_text_model.*text_config"):
        model_from_config(transformers.CLIPModel, copy.deepcopy(config), attn_implementation="sinkhorn")
    mixed = model_from_config(
        transformers.CLIPModel,
        copy.deepcopy(config),
        attn_implementation={"text_config": "sdpa", "vision_config": "sinkhorn"},
    )
    assert config_attn_implementation(mixed.config.vision_config) == "sinkhorn"
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


# --- settings read per forward, cached per value ------------------------------------------------------------------


def test_settings_are_built_once_per_value_and_follow_the_config():
    config = transformers.BertConfig()
    first = sinkhorn_hf.SinkhornSettings.from_config(config)
    assert sinkhorn_hf.SinkhornSettings.from_config(config) is first
    config.sinkhorn_iterations = 5
    assert sinkhorn_hf.SinkhornSettings.from_config(config).iterations == 5
    config.sinkhorn_streaming = True
    assert sinkhorn_hf.SinkhornSettings.from_config(config).streaming is True
    config.sinkhorn_streaming = 1  # equal to True as a dict key, yet not a valid value
    with pytest.raises(ValueError, match="sinkhorn_streaming must be one of"):
        sinkhorn_hf.SinkhornSettings.from_config(config)
    config.sinkhorn_block_size = [4]  # unhashable: validation names it
    config.sinkhorn_streaming = "auto"
    with pytest.raises(ValueError, match="sinkhorn_block_size must be"):
        sinkhorn_hf.SinkhornSettings.from_config(config)


@torch.no_grad()
def test_iterations_set_after_loading_take_effect(tmp_path):
    tiny = sharpen(make_tiny("bert", "sinkhorn"))
    tiny.model.save_pretrained(tmp_path)
    model = transformers.AutoModel.from_pretrained(tmp_path).eval()
    at_three = model(**tiny.inputs).last_hidden_state
    model.config.sinkhorn_iterations = 2
    at_two = model(**tiny.inputs).last_hidden_state
    reference = transformers.AutoModel.from_pretrained(tmp_path, sinkhorn_iterations=2).eval()
    torch.testing.assert_close(at_two, reference(**tiny.inputs).last_hidden_state)
    assert not torch.allclose(at_three[tiny.valid], at_two[tiny.valid], atol=1e-4)


def test_decoder_flag_set_after_loading_is_refused_at_forward():
    tiny = make_tiny("bert", "sinkhorn")
    tiny.model.config.is_decoder = True
    with pytest.raises(sinkhorn_hf.CausalSinkhornError, match="is_decoder=True"):
        tiny.model(**tiny.inputs)


def test_settings_reach_an_explicit_config(tmp_path):
    make_tiny("bert", "sdpa").model.save_pretrained(tmp_path)
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    model = transformers.AutoModel.from_pretrained(
        tmp_path, config=config, attn_implementation="sinkhorn", sinkhorn_iterations=5, sinkhorn_tolerance=1e-3
    )
    assert config_attn_implementation(model.config) == "sinkhorn"
    assert model.config.sinkhorn_iterations == 5 and model.config.sinkhorn_tolerance == 1e-3
    assert config.sinkhorn_iterations == 3, "the caller's config object must not change"
    with pytest.raises(ValueError, match="sinkhorn_iterations must be"):
        transformers.AutoModel.from_pretrained(
            tmp_path, config=config, attn_implementation="sinkhorn", sinkhorn_iterations=0
        )


# --- query validity: inferred from padding masks, or stated ----------------------------------------------------


def _column_sums_with_blocked_key(**forward_kwargs):
    tiny = make_tiny("bert", "sinkhorn")
    tiny.model.config.sinkhorn_iterations = 101  # odd: rows exact; enough steps for columns within 1e-4
    n = tiny.inputs["input_ids"].shape[1]
    mask = torch.ones(3, 1, n, n, dtype=torch.bool)
    mask[..., 2] = False  # key 2 blocked for every query, yet token 2 is a real query
    with torch.no_grad():
        out = tiny.model(tiny.inputs["input_ids"], attention_mask=mask, output_attentions=True, **forward_kwargs)
    return out.attentions[0], n


def test_blocked_key_counts_as_padded_query_by_default():
    attention, n = _column_sums_with_blocked_key()
    rows = torch.arange(n) != 2
    # the documented rule: query 2 is left out of the column marginals, so the other rows are doubly stochastic
    columns = attention[:, :, rows][..., rows].sum(-2)
    torch.testing.assert_close(columns, torch.ones_like(columns), atol=1e-4, rtol=0)


def test_query_mask_states_query_validity():
    attention, n = _column_sums_with_blocked_key(sinkhorn_query_mask=torch.ones(3, 9, dtype=torch.bool))
    columns = attention.sum(-2)  # every row counts: n_q / n_k = n / (n - 1) on the keys that carry mass
    keys = torch.arange(n) != 2
    torch.testing.assert_close(columns[..., keys], torch.full_like(columns[..., keys], n / (n - 1)), atol=1e-4, rtol=0)
    assert torch.all(columns[..., 2] == 0)
    torch.testing.assert_close(attention.sum(-1), torch.ones(3, 2, n), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "query_mask, message",
    [
        (torch.ones(3, 9), "must be a bool tensor"),
        (torch.ones(3, 8, dtype=torch.bool), "must be a bool tensor"),
        (torch.ones(2, 9, dtype=torch.bool), "batch size 2"),
    ],
)
def test_bad_query_mask_is_refused(query_mask, message):
    tiny = make_tiny("bert", "sinkhorn")
    with pytest.raises(ValueError, match=message):
        tiny.model(**tiny.inputs, sinkhorn_query_mask=query_mask)


# --- a hint for processes that never imported sinkhorn_hf ------------------------------------------------------


def test_saved_sinkhorn_config_carries_the_hint(tmp_path):
    tiny = make_tiny("bert", "sinkhorn")
    tiny.model.save_pretrained(tmp_path / "sinkhorn")
    saved = json.loads((tmp_path / "sinkhorn" / "config.json").read_text())
    assert "pip install sinkhorn-hf" in saved["sinkhorn_hf_hint"] and "import sinkhorn_hf" in saved["sinkhorn_hf_hint"]
    model = transformers.AutoModel.from_pretrained(tmp_path / "sinkhorn")
    model.set_attn_implementation("sdpa")
    model.save_pretrained(tmp_path / "sdpa")
    assert "sinkhorn_hf_hint" not in json.loads((tmp_path / "sdpa" / "config.json").read_text())


@pytest.mark.slow
def test_loading_without_import_fails_with_the_hint_in_config(tmp_path):
    make_tiny("bert", "sinkhorn").model.save_pretrained(tmp_path)
    script = (
        "import sys, transformers\n"
        "try:\n    transformers.AutoModel.from_pretrained(sys.argv[1])\n"
        "except Exception as error:\n    print(type(error).__name__, error)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert "sinkhorn" in result.stdout and "not supported" in result.stdout, result.stdout + result.stderr
    assert "import sinkhorn_hf" in (tmp_path / "config.json").read_text()
