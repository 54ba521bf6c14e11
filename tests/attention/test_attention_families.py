"""attn_implementation="sinkhorn" on tiny random models of every supported family."""

import pytest
import torch
from tiny_models import TEXT, make_tiny, sharpen

import sinkhorn_hf  # noqa: F401
from sinkhorn_hf.compat import config_attn_implementation


def _switch(model, iterations):
    model.set_attn_implementation("sinkhorn")
    model.config.sinkhorn_iterations = iterations
    return model


@torch.no_grad()
def test_one_iteration_equals_eager_softmax(family):
    tiny = make_tiny(family, "eager")
    expected = tiny.model(**tiny.inputs).last_hidden_state
    got = _switch(tiny.model, 1)(**tiny.inputs).last_hidden_state
    assert config_attn_implementation(tiny.model.config) == "sinkhorn"
    if tiny.valid is not None:  # padded positions are free to differ; valid ones are not
        expected, got = expected[tiny.valid], got[tiny.valid]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_many_iterations_are_doubly_stochastic(family):
    tiny = make_tiny(family, "sinkhorn")
    tiny.model.config.sinkhorn_iterations = 61
    attentions = tiny.model(**tiny.inputs, output_attentions=True).attentions
    assert attentions and all(a is not None for a in attentions)
    for attention in attentions:
        batch, _, n, _ = attention.shape
        valid = tiny.valid if tiny.valid is not None else torch.ones(batch, n, dtype=torch.bool)
        for b in range(batch):
            keep = valid[b]
            block = attention[b][:, keep][:, :, keep]
            torch.testing.assert_close(block.sum(-1), torch.ones_like(block.sum(-1)), atol=1e-3, rtol=0)
            torch.testing.assert_close(block.sum(-2), torch.ones_like(block.sum(-2)), atol=1e-3, rtol=0)
            assert torch.all(attention[b][:, :, ~keep] == 0), "padded keys must get exactly zero weight"


@pytest.mark.parametrize("family", list(TEXT))
@torch.no_grad()
def test_padding_invariance(family):
    tiny = make_tiny(family, "sinkhorn")
    batched = tiny.model(**tiny.inputs).last_hidden_state
    assert torch.isfinite(batched).all(), "padded query rows must stay finite"
    for b, length in enumerate(tiny.valid.sum(-1).tolist()):
        alone = tiny.model(
            input_ids=tiny.inputs["input_ids"][b : b + 1, :length],
            attention_mask=tiny.inputs["attention_mask"][b : b + 1, :length],
        ).last_hidden_state
        torch.testing.assert_close(batched[b, :length], alone[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("family", ["bert", "distilbert", "vit", "beit"])
@torch.no_grad()
def test_half_precision_with_padding_is_finite(family, dtype):
    tiny = make_tiny(family, "sinkhorn")
    model = tiny.model.to(dtype)
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tiny.inputs.items()}
    out = model(**inputs, output_attentions=True)
    assert out.last_hidden_state.dtype == dtype
    assert torch.isfinite(out.last_hidden_state).all()
    assert all(torch.isfinite(a).all() for a in out.attentions)


def test_dropout_applies_in_training_only():
    tiny = make_tiny("bert", "sinkhorn", dropout=0.1)
    tiny.model.train()
    # keep only attention dropout (BERT's `attention.self.dropout`) active
    for name, module in tiny.model.named_modules():
        if isinstance(module, torch.nn.Dropout) and not name.endswith("self.dropout"):
            module.p = 0.0
    torch.manual_seed(0)
    first = tiny.model(**tiny.inputs).last_hidden_state
    torch.manual_seed(1)
    second = tiny.model(**tiny.inputs).last_hidden_state
    assert not torch.allclose(first, second), "attention dropout must act in training mode"
    tiny.model.eval()
    torch.testing.assert_close(tiny.model(**tiny.inputs).last_hidden_state, tiny.model(**tiny.inputs).last_hidden_state)


def test_gradients_flow_and_are_finite():
    tiny = make_tiny("bert", "sinkhorn")
    tiny.model.config.sinkhorn_iterations = 4
    out = tiny.model(**tiny.inputs).last_hidden_state
    out[tiny.valid].pow(2).sum().backward()
    grads = [p.grad for p in tiny.model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert tiny.model.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("streaming", [False, True])
def test_bf16_autocast_training_step_matches_float32(streaming):
    tiny = sharpen(make_tiny("bert", "sinkhorn"))
    tiny.model.config.sinkhorn_streaming = streaming
    grads, probe = [], torch.randn(16, generator=torch.Generator().manual_seed(0))
    for autocast in (False, True):
        tiny.model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = tiny.model(**tiny.inputs).last_hidden_state
        (out[tiny.valid].float() @ probe).sum().backward()
        grads.append(tiny.model.encoder.layer[0].attention.self.query.weight.grad.clone())
    assert torch.isfinite(grads[1]).all()
    assert (grads[1] - grads[0]).norm() / grads[0].norm() < 0.1
