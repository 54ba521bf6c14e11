"""The layer views of the newer encoder families, against plain backprop of the same model with the same dropout
masks (tiny models from tests/tiny_models.py, padded batches where the family takes one)."""

from __future__ import annotations

import pytest
import torch
import transformers
from adjoint_helpers import loss_and_grads, rel_error, unit_scale_stream
from test_adjoint_layer_views import _assert_same_grads
from tiny_models import NEW_FAMILIES, make_tiny

import sinkhorn_hf
from sinkhorn_hf.adjoint import ADJOINT_FAMILIES, adjoint_stacks, enable_adjoint
from sinkhorn_hf.adjoint.layer_views import ADJOINT_REFUSED
from sinkhorn_hf.compat import model_from_config

VIEWED = [family for family in NEW_FAMILIES if family in ADJOINT_FAMILIES]


@torch.no_grad()
def _unit_scale_embeddings(model: torch.nn.Module) -> None:
    """An O(1) residual stream in every token, as in a trained model (see adjoint_helpers.unit_scale_stream): at
    init (std 0.3 or 0.02) a pre-LN branch's LayerNorm amplifies any rebuild error by 1/scale."""
    unit_scale_stream(model)
    generator = torch.Generator().manual_seed(5)
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            module.weight.normal_(0.0, 1.0, generator=generator)


def _training(family: str, attn: str = "eager", **config):
    tiny = make_tiny(family, attn, layers=3, dropout=0.2, **config)
    tiny.model.train()
    return tiny.model, tiny.inputs


@pytest.mark.parametrize("family", VIEWED)
def test_checkpoint_is_exact_with_dropout(family):
    model, inputs = _training(family)
    loss, exact = loss_and_grads(model, inputs)
    enable_adjoint(model, "checkpoint")
    adjoint_loss, grads = loss_and_grads(model, inputs)
    assert adjoint_loss == pytest.approx(loss, rel=1e-6)  # the views compute the model's own forward
    _assert_same_grads(grads, exact)  # and the recomputation replays the forward's dropout masks


# Euler's rebuild at random init is within 1e-2 for these; the others zero their padded tokens' stream (ESM,
# wav2vec2, HuBERT: the guard's worst-token relative error is then unbounded) or have larger branches (DINOv3,
# SigLIP2 at 2e-2..2), and the guard refuses Euler there: auto stores the inputs it cannot rebuild.
EULER_REBUILDS = ["modernbert", "nomic_bert", "gte", "eurobert", "xlm-roberta-xl", "data2vec-text", "vit_msn", "ijepa"]
EULER_REBUILDS += ["videomae", "audio-spectrogram-transformer"]


@pytest.mark.slow
@pytest.mark.parametrize("family", VIEWED)
def test_euler_or_auto_under_sinkhorn_matches_backprop(family):
    model, inputs = _training(family, sinkhorn_hf.ATTN_IMPLEMENTATION)
    _unit_scale_embeddings(model)
    loss, exact = loss_and_grads(model, inputs)
    enable_adjoint(model, "euler" if family in EULER_REBUILDS else "auto")
    adjoint_loss, grads = loss_and_grads(model, inputs)
    assert adjoint_loss == pytest.approx(loss, rel=1e-6)
    assert rel_error(grads, exact) < 1e-2


def test_siglip2_image_classifier_stack_is_exact():
    tower = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2)
    config = transformers.Siglip2Config(
        text_config=dict(tower, vocab_size=99, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        vision_config=dict(tower, patch_size=8, num_patches=16, attention_dropout=0.2),
    )
    torch.manual_seed(0)
    model = model_from_config(transformers.Siglip2ForImageClassification, config).train()
    tiny = make_tiny("siglip2_vision_model")  # its padded patch batch
    loss, exact = loss_and_grads(model, tiny.inputs)
    enable_adjoint(model, "checkpoint")
    assert [stack.stack.name for stack in adjoint_stacks(model)] == ["vision_model.encoder.layers"]
    adjoint_loss, grads = loss_and_grads(model, tiny.inputs)
    assert adjoint_loss == pytest.approx(loss, rel=1e-6)
    _assert_same_grads(grads, exact)


@pytest.mark.parametrize("stable", [False, True])
def test_wav2vec2_post_ln_and_stable_layer_norm_variants(stable):
    model, inputs = _training("wav2vec2", do_stable_layer_norm=stable, feat_extract_norm="layer")
    loss, exact = loss_and_grads(model, inputs)
    enable_adjoint(model, "checkpoint")
    assert loss_and_grads(model, inputs)[0] == pytest.approx(loss, rel=1e-6)


def test_layerdrop_is_refused_in_training():
    model, inputs = _training("hubert", layerdrop=0.5)
    enable_adjoint(model, "checkpoint")
    with pytest.raises(sinkhorn_hf.UnsupportedModelError, match="config.layerdrop = 0"):
        loss_and_grads(model, inputs)


@pytest.mark.parametrize("family", sorted(ADJOINT_REFUSED))
def test_families_without_a_residual_stack_view_are_refused_with_the_reason(family):
    model, _ = _training(family)
    with pytest.raises(sinkhorn_hf.UnsupportedModelError, match=ADJOINT_REFUSED[family][:30]):
        enable_adjoint(model, "euler")
