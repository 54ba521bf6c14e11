"""The public entry points: clear errors on bad input, residual scaling, save/reload, heun's forward."""

from __future__ import annotations

import pytest
import torch
import transformers
from adjoint_helpers import tiny_config, tiny_model

import sinkhorn_hf
from sinkhorn_hf import UnsupportedModelError, disable_adjoint, enable_adjoint, probe_adjoint
from sinkhorn_hf.adjoint import FORWARD_CHANGING_SCHEMES, SCHEMES, adjoint_stacks


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"scheme": "rk4"}, "unknown adjoint scheme 'rk4'.*auto, euler, heun, checkpoint, momentum, reversible, off"),
        ({"tolerance": 0.0}, "tolerance must be a positive number"),
        ({"tolerance": "high"}, "tolerance must be a positive number"),
        ({"probe_every": 0}, "probe_every must be None or an integer"),
        ({"momentum": 0.0}, r"momentum must lie in \(0, 1\)"),
        ({"residual_scale": -1.0}, "residual_scale must be a positive number or '1/L'"),
        ({"residual_scale": "1/N"}, "residual_scale must be a positive number or '1/L'"),
        ({"allow_inexact": "yes"}, "allow_inexact must be True or False"),
    ],
)
def test_bad_arguments(kwargs, match):
    model, _ = tiny_model("bert")
    with pytest.raises(ValueError, match=match):
        enable_adjoint(model, **kwargs)
    assert adjoint_stacks(model) == []


def test_unsupported_family_is_named():
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50)
    model = transformers.GPT2Model(config)
    with pytest.raises(UnsupportedModelError, match=r"model_type='gpt2'.*Supported model types: bert"):
        enable_adjoint(model, "euler")


def test_decoder_and_gradient_checkpointing_are_refused():
    decoder = transformers.BertModel(tiny_config("bert", is_decoder=True))
    with pytest.raises(UnsupportedModelError, match="bidirectional encoders only"):
        enable_adjoint(decoder, "euler")
    model, _ = tiny_model("bert")
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient_checkpointing_disable"):
        enable_adjoint(model, "euler")


def test_layer_arguments_that_need_gradients_are_refused():
    model, _ = tiny_model("bert")
    enable_adjoint(model, "euler")
    x = torch.randn(2, 5, 16, requires_grad=True)
    bias = torch.zeros(2, 1, 5, 5, requires_grad=True)
    model.encoder.layer[0](x)  # a layer called on its own runs with plain autograd
    with pytest.raises(ValueError, match="'attention_mask' requires grad"):
        model.encoder(x, attention_mask=bias)


def _scale_output_projections(model, s: float) -> None:
    """The reference for residual scaling: b's last linear map (weight and bias) times s gives s·b exactly."""
    with torch.no_grad():
        for layer in model.encoder.layer:
            for linear in (layer.attention.output.dense, layer.output.dense):
                linear.weight.mul_(s)
                linear.bias.mul_(s)


def test_residual_scale_multiplies_every_branch(tmp_path):
    model, inputs = tiny_model("bert", layers=4, dropout=0.0)
    model.eval()
    reference, _ = tiny_model("bert", layers=4, dropout=0.0)
    reference.eval()
    _scale_output_projections(reference, 0.25)
    enable_adjoint(model, "euler", residual_scale="1/L")
    assert model.config.adjoint_residual_scale == "1/L"
    expected = reference(**inputs).last_hidden_state
    torch.testing.assert_close(model(**inputs).last_hidden_state, expected)
    # The scale is part of the function: it survives disable_adjoint and save/reload (+ enable_adjoint).
    disable_adjoint(model)
    torch.testing.assert_close(model(**inputs).last_hidden_state, expected)
    model.save_pretrained(tmp_path)
    reloaded = transformers.BertModel.from_pretrained(tmp_path).eval()
    enable_adjoint(reloaded, "checkpoint")
    torch.testing.assert_close(reloaded(**inputs).last_hidden_state, expected)


def test_stored_residual_scale_is_applied_at_load(tmp_path):
    model, inputs = tiny_model("bert", layers=4, dropout=0.0)
    model.eval()
    with torch.no_grad():
        unscaled = model(**inputs).last_hidden_state
    enable_adjoint(model, "euler", residual_scale="1/L")
    model.save_pretrained(tmp_path)
    reference, _ = tiny_model("bert", layers=4, dropout=0.0)
    _scale_output_projections(reference, 0.25)
    expected = reference.eval()(**inputs).last_hidden_state
    reloaded = transformers.BertModel.from_pretrained(tmp_path).eval()  # no enable_adjoint
    (stack,) = adjoint_stacks(reloaded)
    assert stack.scheme == "off" and "residual scale 0.25" in stack.describe()
    torch.testing.assert_close(reloaded(**inputs).last_hidden_state, expected)
    assert not torch.allclose(expected, unscaled, atol=1e-3)
    enable_adjoint(reloaded, "checkpoint")  # re-enabling gives the same function
    torch.testing.assert_close(reloaded(**inputs).last_hidden_state, expected)
    # A head model holds the encoder as a submodel (two post_init calls): one stack, applied once.
    head = transformers.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    assert [s.stack.name for s in adjoint_stacks(head)] == ["bert.encoder.layer"]
    torch.testing.assert_close(head.bert(**inputs).last_hidden_state, expected)
    from_config = transformers.AutoModel.from_config(reloaded.config)
    assert len(adjoint_stacks(from_config)) == 1


def test_heun_changes_the_forward_as_documented():
    # Heun: z = x + ½[f(x) + f(x + f(x))] per residual branch f, computed here directly on a pre-LN ViT layer.
    model, inputs = tiny_model("vit", layers=1, dropout=0.0)
    model.eval()
    layer = model.layers[0]
    x = model.embeddings(inputs["pixel_values"])

    def heun(x, branch):
        k1 = branch(x)
        return x + 0.5 * (k1 + branch(x + k1))

    h = heun(x, lambda t: layer.attention(layer.layernorm_before(t))[0])
    expected = model.layernorm(heun(h, lambda t: layer.mlp(layer.layernorm_after(t))))
    enable_adjoint(model, "heun")
    torch.testing.assert_close(model(**inputs).last_hidden_state, expected)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_only_forward_changing_schemes_change_the_output(scheme):
    model, inputs = tiny_model("bert", dropout=0.0)
    model.eval()
    with torch.no_grad():
        plain = model(**inputs).last_hidden_state
        enable_adjoint(model, scheme)
        out = model(**inputs).last_hidden_state
    assert torch.allclose(out, plain, rtol=1e-5, atol=1e-6) != (scheme in FORWARD_CHANGING_SCHEMES)


@pytest.mark.parametrize("scheme", ["heun", "auto"])
def test_output_attentions_has_one_map_per_layer(scheme):
    # Heun evaluates each branch twice and auto probes the stack: neither may add attention maps.
    model, inputs = tiny_model("bert", dropout=0.0)
    enable_adjoint(model, scheme)
    out = model(**inputs, output_attentions=True, output_hidden_states=True)
    assert len(out.attentions) == 3 and len(out.hidden_states) == 4
    out.last_hidden_state.sum().backward()


def test_probe_leaves_grads_and_rng_alone():
    model, inputs = tiny_model("bert", dropout=0.2)
    state = torch.get_rng_state()
    report = probe_adjoint(model, inputs)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(p.grad is None for p in model.parameters())
    assert adjoint_stacks(model) == []  # probed under euler temporarily
    assert report.scheme == "euler" and len(report.step_errors) == 3
    assert report.grad_cosine > 0.999 and report.finite and report.nonfinite_fraction == 0.0
    stored = probe_adjoint(model, inputs, scheme="checkpoint")
    assert stored.grad_rel_error < 1e-6


def test_probe_refuses_frozen_models_and_off():
    model, inputs = tiny_model("bert")
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="needs trainable parameters"):
        probe_adjoint(model, inputs)
    with pytest.raises(ValueError, match="needs an adjoint scheme"):
        probe_adjoint(model, inputs, scheme="off")
    assert adjoint_stacks(model) == []


def test_public_api_is_exported():
    import sinkhorn_hf.adjoint as adjoint

    assert "InexactAdjointError" in adjoint.__all__ and "restore_auto_choices" in adjoint.__all__
    for name in ("enable_adjoint", "disable_adjoint", "probe_adjoint"):
        assert name in sinkhorn_hf.__all__ and getattr(sinkhorn_hf, name) is getattr(adjoint, name)
    assert all(hasattr(adjoint, name) for name in adjoint.__all__)
