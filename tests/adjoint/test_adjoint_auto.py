"""The auto policy: reconstruction where the reverse pass is accurate, exact anchors where it is not."""

from __future__ import annotations

import logging

import pytest
import torch
from adjoint_helpers import loss_and_grads, ode_like, rel_error, tiny_model

from sinkhorn_hf.adjoint import enable_adjoint

LOGGER = "sinkhorn_hf.adjoint.auto"


def _ode_like(residual_scale, layers=16):
    return *ode_like(layers), residual_scale


def test_ode_like_stack_is_rebuilt(caplog):
    model, inputs, scale = _ode_like("1/L")
    enable_adjoint(model, "off", residual_scale=scale)
    _, exact = loss_and_grads(model, inputs)
    (stack,) = enable_adjoint(model, "auto", tolerance=1e-2)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        _, grads = loss_and_grads(model, inputs)
    assert stack.anchors == set() and stack.choice.anchors == []
    assert max(stack.choice.errors) < 1e-2
    # (At this toy size the CPU RNG states, 5 KiB per branch call, outweigh a stored layer input.)
    assert stack.choice.adjoint_bytes < stack.choice.plain_bytes
    assert "rebuilds every layer input" in caplog.text
    assert rel_error(grads, exact) < 1e-2


def test_same_stack_without_scaling_is_anchored(caplog):
    model, inputs, _ = _ode_like(None)
    _, exact = loss_and_grads(model, inputs)
    (stack,) = enable_adjoint(model, "auto", tolerance=1e-2)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        _, grads = loss_and_grads(model, inputs)
    assert len(stack.anchors) >= 12  # residual branches of gain 0.5: one reverse step is off by >1%
    assert all(e > 1e-2 for n, e in enumerate(stack.choice.errors) if n in stack.anchors)
    assert "anchors at layers [0, 1, 2" in caplog.text
    assert rel_error(grads, exact) < 1e-2


def test_tiny_cls_token_at_init_is_detected():
    # DeiT's init leaves the CLS/distillation tokens ~0.02: LayerNorm amplifies their rebuild error ~50x.
    model, inputs = tiny_model("deit", dropout=0.0)
    _, exact = loss_and_grads(model, inputs)
    enable_adjoint(model, "euler", allow_inexact=True)
    with pytest.warns(RuntimeWarning, match=r"rebuilt inputs of layers \[0, 1, 2\] are off"):
        _, blind = loss_and_grads(model, inputs)
    assert rel_error(blind, exact) > 0.5  # the reverse step alone gives wrong gradients (the guard says so)
    (stack,) = enable_adjoint(model, "auto")
    _, grads = loss_and_grads(model, inputs)
    assert stack.anchors
    assert rel_error(grads, exact) < 1e-2


def test_probe_every_reprobes():
    model, inputs, scale = _ode_like("1/L", layers=2)
    (stack,) = enable_adjoint(model, "auto", probe_every=2, residual_scale=scale)
    seen = []
    for _ in range(4):
        loss_and_grads(model, inputs)
        seen.append(stack.choice.pass_index)
    assert seen == [1, 1, 3, 3]
    with torch.no_grad():
        model(**inputs)  # evaluation passes neither count nor probe
    loss_and_grads(model, inputs)
    assert stack.passes == 5 and stack.choice.pass_index == 5


def test_pretrained_minilm_falls_back(minilm_path, caplog):
    """On the real MiniLM, reverse steps are off by O(1) (post-LN residuals too large): auto stores all."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    model = AutoModel.from_pretrained(minilm_path).train()
    inputs = dict(
        tokenizer(["a gripping, beautifully shot film", "dull and far too long"], return_tensors="pt", padding=True)
    )
    _, exact = loss_and_grads(model, inputs)
    (stack,) = enable_adjoint(model, "auto")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        _, grads = loss_and_grads(model, inputs)
    assert stack.choice.anchors == list(range(6))
    assert min(stack.choice.errors) > 0.1
    assert "falls back to checkpointing every layer" in caplog.text
    assert rel_error(grads, exact) < 1e-5
