"""The PyTorch routes on every device there is (CPU always, CUDA when present: scripts/gpu_check.sh runs this file
on a GPU machine) against autograd through the float64 log-domain reference on the CPU: the dense route in the
kernel and the log domain and the streaming route, padded batches with a bias, scores up to ±1e4, float32 and
float64 inputs."""

import math

import pytest
import torch

import sinkhorn_hf.attention.dense as dense_module
from sinkhorn_hf.attention import SinkhornSettings
from sinkhorn_hf.attention.routes import sinkhorn_attention
from sinkhorn_hf.attention.sinkhorn import sinkhorn

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]
ROUTES = {
    "dense-kernel": dict(streaming=False),
    "dense-log": dict(streaming=False),
    "streaming": dict(streaming=True, block_size=4),
}


def padded_case(peak: float, seed: int, n=9, lengths=(9, 6), heads=2, dim=4):
    """float64 CPU q, k, v (B, H, N, D) with |q·k| up to about ``peak``, a (B, 1, N, N) bias, padding masks."""
    generator = torch.Generator().manual_seed(seed)
    shape = (len(lengths), heads, n, dim)
    q, k, v = (torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(3))
    scale = math.sqrt(peak / dim) / 2
    q, k = (q * scale).round(), (k * scale).round()  # integers: the same scores in float32 and float64
    bias = torch.randn(len(lengths), 1, n, n, generator=generator, dtype=torch.float64).round()
    valid = torch.arange(n)[None] < torch.tensor(lengths)[:, None]
    allowed = valid[:, None, None, :].expand(len(lengths), 1, n, n).contiguous()  # materialised, as transformers
    return (q, k, v, bias), allowed, valid[:, None, :, None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("peak", [10.0, 1e4])
@pytest.mark.parametrize("iterations", [2, 3, 4])
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("device", DEVICES)
def test_route_on_device_matches_the_float64_reference(device, route, iterations, peak, dtype, monkeypatch):
    if route == "dense-log":
        monkeypatch.setattr(dense_module, "kernel_domain_fits", lambda *args: False)
    tensors, allowed, valid = padded_case(peak, seed=iterations)
    leaves = [t.to(device, dtype).requires_grad_() for t in tensors]
    settings = SinkhornSettings(iterations=iterations, backend="torch", **ROUTES[route])
    out, _ = sinkhorn_attention(
        *leaves[:3], bias=leaves[3], allowed=allowed.to(device), query_valid=valid.to(device), settings=settings
    )
    expected_leaves = [t.clone().requires_grad_() for t in tensors]
    q, k, v, bias = expected_leaves
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + bias
    expected = sinkhorn(scores, allowed, valid, iterations) @ v
    assert out.device.type == device and torch.isfinite(out).all()
    rows = valid.expand_as(expected)
    eps = torch.finfo(dtype).eps
    tolerance = 64 * eps * max(peak, 1.0)  # potentials of size peak carry eps·peak into every logit
    torch.testing.assert_close(out.cpu().double()[rows], expected[rows], rtol=0, atol=tolerance)
    upstream = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    upstream = upstream * rows  # the padded rows' outputs are not used
    got = torch.autograd.grad((out * upstream.to(device, dtype)).sum(), leaves)
    wanted = torch.autograd.grad((expected * upstream).sum(), expected_leaves)
    for mine, theirs in zip(got, wanted, strict=True):
        assert torch.isfinite(mine).all()
        if peak <= 10:  # at ±1e4 the gradient is as sensitive as exp(1e4·eps): finiteness is what can be asked
            scale = max(1.0, theirs.abs().max().item())
            torch.testing.assert_close(mine.cpu().double(), theirs, rtol=0, atol=1e3 * eps * scale)
