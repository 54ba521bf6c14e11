"""The Triton kernels against autograd through the float64 log-domain reference (and SoftMax for K = 1)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from sinkhorn_hf.attention.sinkhorn import log_sinkhorn  # noqa: E402
from sinkhorn_hf.attention.triton import (  # noqa: E402
    TritonUnsupportedError,
    triton_sinkhorn_attention,
    triton_unsupported_reason,
)

DEVICE = "cuda" if torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1" else "cpu"


def _inputs(lq, lk, dim, *, heads=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, lq, dim, generator=generator, dtype=torch.float64)
    k = torch.randn(1, heads, lk, dim, generator=generator, dtype=torch.float64)
    v = torch.randn(1, heads, lk, dim, generator=generator, dtype=torch.float64)
    bias = torch.randn(1, heads, lq, lk, generator=generator, dtype=torch.float64)
    grad = torch.randn(1, heads, lq, dim, generator=generator, dtype=torch.float64)
    return q, k, v, bias, grad


def _reference(q, k, v, bias, allowed, query_valid, iterations):
    """A V with A from the float64 log-domain Sinkhorn loop; zero rows where nothing is allowed."""
    b, h, lq, lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if bias is not None:
        scores = scores + bias
    allowed = allowed.expand(b, h, lq, lk)
    weights = log_sinkhorn(scores, allowed, query_valid.expand(b, h, lq, 1), iterations).exp()
    return weights @ v


def _check(iterations, lq, lk, *, dim=32, block_m=64, block_n=64, use_bias=True, allowed=None, query_valid=None):
    q, k, v, bias, grad = _inputs(lq, lk, dim)
    allowed = torch.ones(1, 1, 1, lk, dtype=torch.bool) if allowed is None else allowed
    query_valid = torch.ones(1, 1, lq, 1, dtype=torch.bool) if query_valid is None else query_valid
    bias = bias if use_bias else None
    assert triton_unsupported_reason(q.float(), k.float(), v.float()) is None
    leaves = [None if x is None else x.float().to(DEVICE).requires_grad_() for x in (q, k, v, bias)]
    output = triton_sinkhorn_attention(
        *leaves[:3],
        iterations=iterations,
        allowed=allowed.to(DEVICE),
        bias=leaves[3],
        query_valid=query_valid.to(DEVICE),
        block_m=block_m,
        block_n=block_n,
    )
    output.backward(grad.float().to(DEVICE))
    exact = [None if x is None else x.clone().requires_grad_() for x in (q, k, v, bias)]
    expected = _reference(*exact, allowed, query_valid, iterations)
    expected.backward(grad)
    assert output.dtype == torch.float32 and output.shape == expected.shape
    torch.testing.assert_close(output.double().cpu(), expected, rtol=1e-4, atol=1e-5)
    for name, got, want in zip("qkvb", leaves, exact, strict=True):
        if want is None:
            continue
        scale = want.grad.abs().max().item()
        error = (got.grad.double().cpu() - want.grad).abs().max().item()
        assert error <= 1e-4 * scale + 1e-6, f"d{name}: max error {error:.2e} (scale {scale:.2e})"
    return output


# The interpreter runs every program instance in Python: one case of each test stays in the fast suite, the other
# iteration counts and tile shapes are slow.
SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "iterations", [pytest.param(1, marks=SLOW), 2, pytest.param(3, marks=SLOW), pytest.param(4, marks=SLOW)]
)
def test_padding_bias_and_unequal_lengths_match_reference(iterations):
    allowed = torch.ones(1, 1, 1, 24, dtype=torch.bool)
    allowed[..., -5:] = False  # padded keys
    query_valid = torch.ones(1, 1, 40, 1, dtype=torch.bool)
    query_valid[:, :, -3:] = False  # padded queries: out of the column marginals, still finite
    _check(iterations, 40, 24, allowed=allowed, query_valid=query_valid)


@pytest.mark.parametrize(
    ("iterations", "block_m", "block_n"),
    [(3, 16, 16), pytest.param(2, 16, 32, marks=SLOW), pytest.param(4, 32, 16, marks=SLOW)],
)
def test_several_tiles_match_reference(iterations, block_m, block_n):
    """Online logsumexp across query and key blocks, partial last blocks (40 = 16 + 16 + 8)."""
    allowed = torch.ones(1, 1, 1, 40, dtype=torch.bool)
    allowed[..., -7:] = False
    _check(iterations, 40, 40, block_m=block_m, block_n=block_n, allowed=allowed)


def test_per_query_mask_with_an_empty_row_gives_zero_output():
    """A full (B, H, Lq, Lk) support; a query with no allowed key gets a zero row and zero gradients."""
    generator = torch.Generator().manual_seed(1)
    allowed = torch.rand(1, 2, 24, 24, generator=generator) > 0.3
    allowed[:, :, 5] = False
    output = _check(3, 24, 24, allowed=allowed, use_bias=False, block_m=16, block_n=16)
    assert bool((output[:, :, 5] == 0).all())


@pytest.mark.slow
def test_head_dim_64_without_bias():
    _check(2, 24, 24, dim=64, use_bias=False)


def test_one_step_is_sdpa():
    q, k, v, _, _ = _inputs(24, 24, 32)
    q, k, v = (x.float().to(DEVICE) for x in (q, k, v))
    allowed = torch.ones(1, 1, 1, 24, dtype=torch.bool, device=DEVICE)
    allowed[..., -4:] = False
    got = triton_sinkhorn_attention(q, k, v, iterations=1, allowed=allowed, block_m=16, block_n=16)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_value_only_gradient():
    q, k, v, _, grad = _inputs(24, 24, 32)
    value = v.float().to(DEVICE).requires_grad_()
    triton_sinkhorn_attention(q.float().to(DEVICE), k.float().to(DEVICE), value, iterations=2).backward(
        grad.float().to(DEVICE)
    )
    exact = v.clone().requires_grad_()
    ones = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    _reference(q, k, exact, None, ones, ones, 2).backward(grad)
    torch.testing.assert_close(value.grad.double().cpu(), exact.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, pytest.param(torch.float16, marks=SLOW)])
def test_half_precision_inputs(dtype):
    """16-bit inputs, float32 accumulation: close to the float64 reference at 16-bit tolerance."""
    q, k, v, _, grad = _inputs(24, 24, 32)
    leaves = [x.to(dtype).to(DEVICE).requires_grad_() for x in (q, k, v)]
    output = triton_sinkhorn_attention(*leaves, iterations=3, block_m=32, block_n=32)
    output.backward(grad.to(dtype).to(DEVICE))
    ones = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    exact = [x.to(dtype).double().requires_grad_() for x in (q, k, v)]
    expected = _reference(*exact, None, ones, ones, 3)
    expected.backward(grad.to(dtype).double())
    assert output.dtype == dtype and all(leaf.grad.dtype == dtype for leaf in leaves)
    torch.testing.assert_close(output.double().cpu(), expected, rtol=3e-2, atol=3e-2)
    for got, want in zip(leaves, exact, strict=True):
        scale = want.grad.abs().max().item()
        assert (got.grad.double().cpu() - want.grad).abs().max().item() <= 3e-2 * scale


def test_unsupported_cases_say_why():
    q = torch.randn(1, 2, 8, 32)
    assert "dropout" in triton_unsupported_reason(q, q, q, dropout=0.1)
    assert "tolerance" in triton_unsupported_reason(q, q, q, tolerance=1e-3)
    assert "implicit" in triton_unsupported_reason(q, q, q, backward="implicit")
    small = torch.randn(1, 2, 8, 8)
    assert "head dim" in triton_unsupported_reason(small, small, small)
    assert "float32" in triton_unsupported_reason(q.double(), q.double(), q.double())
    assert "batch and heads" in triton_unsupported_reason(q, q[:, :1], q[:, :1])
    with pytest.raises(TritonUnsupportedError, match="dropout"):
        triton_sinkhorn_attention(q, q, q, iterations=2, dropout=0.1)
    assert issubclass(TritonUnsupportedError, NotImplementedError)
    with pytest.raises(ValueError, match="power of two"):
        triton_sinkhorn_attention(q, q, q, iterations=2, block_m=24)
    with pytest.raises(ValueError, match="iterations"):
        triton_sinkhorn_attention(q, q, q, iterations=0)
