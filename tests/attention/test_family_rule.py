"""The rule that admits a model type (sinkhorn_hf/families.py), checked on a tiny model of every newer family with a
padded batch where the family takes one: one interface call per attention layer, none causal, the padding mask (and
ModernBERT's sliding-window band) in the support; K=1 equals eager softmax, K=3 differs, K=25 is doubly stochastic
over the support; padding appended leaves valid tokens unchanged; save/reload keeps Sinkhorn. Refusals name their
reason."""

from __future__ import annotations

import pytest
import torch
import transformers
from tiny_models import CLASSIC_FAMILIES, FAMILIES, NEW_FAMILIES, PADDED, PEAKED, alone, last_hidden_state, make_tiny
from transformers import AttentionInterface

import sinkhorn_hf
from sinkhorn_hf.attention import support_from_mask
from sinkhorn_hf.attention.interface import sinkhorn_attention_forward
from sinkhorn_hf.compat import config_attn_implementation, model_from_config


@pytest.fixture
def calls():
    """The arguments of every call of the registered sinkhorn attention function, while the test runs."""
    recorded = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        recorded.append((module, query.shape[-2], attention_mask, kwargs.get("is_causal")))
        return sinkhorn_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(sinkhorn_hf.ATTN_IMPLEMENTATION, spy)
    yield recorded
    AttentionInterface.register(sinkhorn_hf.ATTN_IMPLEMENTATION, sinkhorn_attention_forward)


def _layers(config) -> int:
    """Attention layers of a tiny model (Swin: one block per stage)."""
    if hasattr(config, "depths"):
        return sum(config.depths)
    return getattr(config, "num_hidden_layers", None) or config.encoder_layers


def _expected_support(model, module, valid: torch.Tensor, n: int) -> torch.Tensor:
    """(B, N, N) bool: the keys each query may attend to, built from the inputs and the config alone."""
    valid = torch.ones(1, n, dtype=torch.bool) if valid is None else valid
    support = valid[:, :, None] & valid[:, None, :]
    if model.config.model_type == "modernbert" and module.sliding_window is not None:
        position = torch.arange(n)
        support = support & ((position[:, None] - position[None, :]).abs() <= model.config.sliding_window)
    return support


def _assert_the_rule(tiny, calls) -> None:
    """Every layer called the interface, bidirectionally, with the padding mask (and band) as its support."""
    assert len(calls) == _layers(tiny.model.config), "one call of the attention function per layer"
    for module, n, mask, is_causal in calls:
        assert not is_causal and not getattr(module, "is_causal", False)
        expected = _expected_support(tiny.model, module, tiny.valid, n)
        allowed = support_from_mask(mask, n, n, torch.device("cpu")).allowed[:, 0]
        allowed, expected = torch.broadcast_tensors(allowed, expected)
        rows = expected.any(-1)  # valid queries: padded query rows may attend anywhere
        assert torch.equal(allowed[rows], expected[rows]), f"{type(module).__name__}: the support is not the mask's"


@pytest.mark.parametrize("family", CLASSIC_FAMILIES)
@torch.no_grad()
def test_the_rule_holds_for_the_first_generation(family, calls):
    # their K=1 / marginals / padding checks are in test_attention_families.py
    tiny = make_tiny(family, "sinkhorn")
    last_hidden_state(tiny)
    _assert_the_rule(tiny, calls)


def _switch(tiny, iterations: int):
    tiny.model.set_attn_implementation("sinkhorn")
    tiny.model.config.sinkhorn_iterations = iterations
    return tiny


@pytest.mark.parametrize("family", NEW_FAMILIES)
@torch.no_grad()
def test_family_is_served_exactly(family, calls):
    tiny = make_tiny(family, "eager", **PEAKED)
    softmax = last_hidden_state(tiny)
    one = last_hidden_state(_switch(tiny, 1))

    _assert_the_rule(tiny, calls)

    valid = tiny.valid if tiny.valid is not None else torch.ones(softmax.shape[:2], dtype=torch.bool)
    torch.testing.assert_close(one[valid], softmax[valid], rtol=1e-5, atol=1e-5)
    tiny.model.config.sinkhorn_iterations = 3
    assert (last_hidden_state(tiny)[valid] - one[valid]).abs().max() > 1e-2, "K=3 must differ from softmax"

    # marginals at K=25 (the default init: peaked attention on a narrow band needs more iterations to converge)
    calls.clear()
    tiny = _switch(make_tiny(family, "eager"), 25)
    attentions = tiny.model(**tiny.inputs, output_attentions=True).attentions
    assert len(attentions) == len(calls) == _layers(tiny.model.config)
    for attention, (module, n, _, _) in zip(attentions, calls, strict=True):
        support = _expected_support(tiny.model, module, tiny.valid, n)[:, None].expand_as(attention)
        rows = support.any(-1, keepdim=True)
        assert torch.all(attention[rows.expand_as(support) & ~support] == 0), "mass outside the support"
        real = attention * rows  # rows of valid queries: each sums to 1, each valid key column to 1
        torch.testing.assert_close(real.sum(-1)[rows[..., 0]], torch.ones(int(rows.sum())), atol=1e-3, rtol=0)
        columns = real.sum(-2)[support.any(-2)]
        torch.testing.assert_close(columns, torch.ones_like(columns), atol=1e-3, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("family", [family for family in NEW_FAMILIES if family in PADDED])
@torch.no_grad()
def test_appended_padding_leaves_valid_tokens_unchanged(family):
    tiny = _switch(make_tiny(family, "eager", **PEAKED), 5)
    batched = last_hidden_state(tiny)
    assert torch.isfinite(batched).all(), "padded rows must stay finite"
    for b in range(len(tiny.valid)):
        inputs, count = alone(tiny, b)
        single = last_hidden_state(type(tiny)(tiny.model, inputs, None))
        torch.testing.assert_close(batched[b, :count], single[0, :count], rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("family", NEW_FAMILIES)
@torch.no_grad()
def test_save_and_reload_keep_sinkhorn(family, tmp_path):
    tiny = _switch(make_tiny(family, "eager", **PEAKED), 4)
    tiny.model.save_pretrained(tmp_path)
    reloaded = type(tiny.model).from_pretrained(tmp_path).eval()
    assert config_attn_implementation(reloaded.config) == "sinkhorn" and reloaded.config.sinkhorn_iterations == 4
    torch.testing.assert_close(
        last_hidden_state(type(tiny)(reloaded, tiny.inputs, None)), last_hidden_state(tiny), rtol=0, atol=0
    )


# --- refusals ----------------------------------------------------------------------------------------------------

_TINY = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)


@pytest.mark.parametrize(
    "config, model_name, reason",
    [
        (transformers.MPNetConfig(vocab_size=99, **_TINY), "MPNetModel", "relative position bias"),
        (transformers.DebertaConfig(vocab_size=99, **_TINY), "DebertaModel", "disentangled"),
        (transformers.DebertaV2Config(vocab_size=99, **_TINY), "DebertaV2Model", "disentangled"),
        (
            transformers.LongformerConfig(vocab_size=99, attention_window=4, **_TINY),
            "LongformerModel",
            "sliding-window and global",
        ),
        (transformers.HieraConfig(), "HieraModel", "mask-unit"),  # refused before any layer is built
    ],
)
def test_families_with_their_own_attention_are_refused_with_the_reason(config, model_name, reason):
    with pytest.raises(sinkhorn_hf.UnsupportedModelError, match=f"without transformers' AttentionInterface.*{reason}"):
        model_from_config(getattr(transformers, model_name), config, attn_implementation="sinkhorn")


def test_unvalidated_family_is_refused_as_not_validated():
    config = transformers.RoFormerConfig(vocab_size=99, embedding_size=16, **_TINY)
    with pytest.raises(sinkhorn_hf.UnsupportedModelError, match="'roformer'.* is not validated with sinkhorn_hf"):
        model_from_config(transformers.RoFormerModel, config, attn_implementation="sinkhorn")


def test_every_served_family_has_a_tiny_model():
    # a type admitted by families.py without a model in the tests would be served unchecked
    composites = {"clip", "siglip", "siglip2"}  # their vision towers are the tested types
    assert set(sinkhorn_hf.SUPPORTED_FAMILIES) - composites == set(FAMILIES)


@torch.no_grad()
def test_modernbert_band_without_padding_is_the_support(calls):
    # no padding: the mask transformers builds for the local layers is the band alone, and it must still arrive
    tiny = _switch(make_tiny("modernbert", "eager"), 25)
    unpadded = {"input_ids": tiny.inputs["input_ids"][2:], "attention_mask": tiny.inputs["attention_mask"][2:]}
    attentions = tiny.model(**unpadded, output_attentions=True).attentions
    local = [i for i, (module, *_) in enumerate(calls) if module.sliding_window is not None]
    assert local, "the tiny ModernBERT must have a local layer"
    band = _expected_support(tiny.model, calls[local[0]][0], None, 9)[0]
    assert not band.all()
    attention = attentions[local[0]][0]
    assert torch.all(attention[:, ~band] == 0)
    torch.testing.assert_close(attention.sum(-2), torch.ones(2, 9), atol=1e-3, rtol=0)
