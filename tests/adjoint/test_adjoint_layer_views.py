"""Every supported family, against plain backprop of the same model with the same dropout masks."""

from __future__ import annotations

import pytest
import torch
from adjoint_helpers import loss_and_grads, rel_error, tiny_model, unit_scale_stream

import sinkhorn_hf
from sinkhorn_hf.adjoint import adjoint_stacks, disable_adjoint, enable_adjoint


def _assert_same_grads(grads, exact):
    assert grads.keys() == exact.keys()
    for name, g in exact.items():
        if g is None:
            assert grads[name] is None, name
        else:
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_checkpoint_is_exact_with_dropout(model_type):
    model, inputs = tiny_model(model_type, dropout=0.2)
    loss, exact = loss_and_grads(model, inputs)
    enable_adjoint(model, "checkpoint")
    adjoint_loss, grads = loss_and_grads(model, inputs)
    assert adjoint_loss == pytest.approx(loss, rel=1e-6)  # the layer views compute the model's own forward
    _assert_same_grads(grads, exact)  # and the recomputation replays the forward's dropout masks


def test_euler_rebuilds_small_residual_stacks(model_type):
    # Random init (std 0.02) gives small residual branches: the reverse step is accurate, with dropout on.
    model, inputs = tiny_model(model_type, dropout=0.2)
    unit_scale_stream(model)
    loss, exact = loss_and_grads(model, inputs)
    enable_adjoint(model, "euler")
    adjoint_loss, grads = loss_and_grads(model, inputs)
    assert adjoint_loss == pytest.approx(loss, rel=1e-6)
    assert rel_error(grads, exact) < 1e-2


@pytest.mark.parametrize("attn", ["eager", "sdpa", sinkhorn_hf.ATTN_IMPLEMENTATION])
@pytest.mark.parametrize("model_type", ["bert", "vit"])
def test_independent_of_attention_implementation(model_type, attn):
    model, inputs = tiny_model(model_type, dropout=0.2, attn=attn)
    unit_scale_stream(model)
    _, exact = loss_and_grads(model, inputs)
    enable_adjoint(model, "checkpoint")
    _, stored = loss_and_grads(model, inputs)
    _assert_same_grads(stored, exact)
    enable_adjoint(model, "euler")
    _, rebuilt = loss_and_grads(model, inputs)
    assert rel_error(rebuilt, exact) < 1e-2


def test_disable_restores_the_layers():
    model, inputs = tiny_model("bert")
    layers = list(model.encoder.layer)
    enable_adjoint(model, "euler")
    assert all("forward" in layer.__dict__ for layer in layers)
    assert len(adjoint_stacks(model)) == 1
    disable_adjoint(model)
    assert all("forward" not in layer.__dict__ for layer in layers)
    assert adjoint_stacks(model) == []
    assert not model.encoder._forward_pre_hooks and not model.encoder._forward_hooks
