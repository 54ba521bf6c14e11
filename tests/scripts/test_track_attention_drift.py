"""scripts/track_attention_drift.py: the attention-only ViT's SoftMax attention recomputed from q, k equals a
float64 reference and the model's own K = 1 attention; the MNIST loop writes records at the tracked steps."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture
def script(load_script):
    return load_script("track_attention_drift")


def test_vit_softmax_attentions_match_float64_reference_and_the_model(script):
    from sinkformers_vit import AttentionOnlyViT

    torch.manual_seed(0)
    model = AttentionOnlyViT(patch_size=7, iterations=1, hidden_size=16, heads=2, head_dim=8, depth=2).eval()
    images = torch.randn(3, 1, 28, 28)
    (first, second) = script.vit_softmax_attentions(model, {"images": images})
    assert first.shape == (3, 2, 17, 17)
    # layer 0 by hand in float64: tokens → LN → q, k → softmax(q kᵀ/√d)
    p = {name: value.detach().double() for name, value in model.named_parameters()}
    x = torch.nn.functional.conv2d(images.double(), p["patches.weight"], p["patches.bias"], stride=7)
    x = torch.cat([p["cls_token"].expand(3, -1, -1), x.flatten(2).transpose(1, 2)], dim=1) + p["positions"]
    h = torch.nn.functional.layer_norm(x, (16,), p["blocks.0.norm.weight"], p["blocks.0.norm.bias"])
    q, k, _ = (h @ p["blocks.0.attention.to_qkv.weight"].T).view(3, 17, 3, 2, 8).permute(2, 0, 3, 1, 4)
    torch.testing.assert_close(first.double(), torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, -1), atol=1e-6, rtol=0)
    # K = 1 is SoftMax: the model's own output is W_o (A v) with the same A
    out = model.blocks[0].attention(model.blocks[0].norm(x.float()))
    qkv = model.blocks[0].attention.to_qkv(model.blocks[0].norm(x.float())).view(3, 17, 3, 2, 8).permute(2, 0, 3, 1, 4)
    mixed = (first @ qkv[2]).transpose(1, 2).reshape(3, 17, 16)
    torch.testing.assert_close(out, model.blocks[0].attention.to_out(mixed), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(first, second)


@pytest.mark.slow
def test_mnist_loop_end_to_end(script, tiny_mnist, tmp_path):
    data = tiny_mnist(300, 120)
    out = tmp_path / "drift"
    argv = ["mnist", "--data", str(data), "--epochs", "1", "--every", "2", "--device", "cpu", "--out", str(out)]
    assert script.main(argv) == 0
    saved = json.loads((out / "attention_marginals.json").read_text())
    assert [record["step"] for record in saved["records"]] == [0, 2, 3]  # 3 steps of 100; the last one added
    assert all(record["layers"][0]["softmax_column_std"] > 0 for record in saved["records"])
    assert (out / "attention_marginals.png").stat().st_size > 10_000
