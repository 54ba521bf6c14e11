"""Finite and correct at extreme scores: every K, padded batches, scores up to ±1e4, dense and streaming routes,
against the float64 log-domain reference (``sinkhorn.log_sinkhorn``); the column target in the input's dtype."""

import math

import pytest
import torch
from tiny_models import make_tiny, sharpen

from sinkhorn_hf.attention import SinkhornSettings
from sinkhorn_hf.attention.routes import sinkhorn_attention
from sinkhorn_hf.attention.sinkhorn import log_marginals, sinkhorn

ROUTES = {"dense": dict(streaming=False), "streaming": dict(streaming=True, block_size=3)}
PEAK = 1e4


def extreme_case(dtype, seed=0, n=6, lengths=(6, 4), heads=2, dim=2):
    """Integer q, k with |q·k| up to about PEAK (exact in float32 and float64, so both see the same scores),
    value ~ N(0, 1), padding masks (the last keys and queries of the second sequence)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (len(lengths), heads, n, dim)
    bound = int(math.sqrt(PEAK / dim))
    q, k = (torch.randint(-bound, bound + 1, shape, generator=generator).to(dtype) for _ in range(2))
    v = torch.randn(shape, generator=generator, dtype=dtype)
    valid = torch.arange(n)[None] < torch.tensor(lengths)[:, None]
    allowed = valid[:, None, None, :].expand(len(lengths), 1, n, n)
    return [t.requires_grad_() for t in (q, k, v)], allowed, valid[:, None, :, None]


def route(tensors, allowed, valid, iterations, name):
    settings = SinkhornSettings(iterations=iterations, **ROUTES[name])
    return sinkhorn_attention(*tensors, allowed=allowed, query_valid=valid, scale=1.0, settings=settings)[0]


def reference(tensors, allowed, valid, iterations):
    q, k, v = (t.double() for t in tensors)
    return sinkhorn(q @ k.transpose(-1, -2), allowed, valid, iterations) @ v


def test_the_reported_case_keeps_the_padded_row_finite():
    """K=2, queries ×1e3, the last key and query padded (the report: the padded row was [-inf, -inf])."""
    torch.manual_seed(6)
    q, k, v = torch.randn(3, 1, 1, 4, 2).unbind(0)
    q = q * 1e3
    allowed = torch.tensor([True, True, True, False]).expand(1, 1, 4, 4)
    valid = torch.tensor([True, True, True, False]).view(1, 1, 4, 1)
    for name in ROUTES:
        out = route([q, k, v], allowed, valid, 2, name)
        assert torch.isfinite(out).all(), f"{name}: {out}"
        expected = reference([q, k, v], allowed, valid, 2)
        torch.testing.assert_close(out[..., :3, :], expected[..., :3, :].float(), rtol=0, atol=1e-3)


@pytest.mark.parametrize("iterations", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("name", ROUTES)
def test_float32_at_scores_of_1e4_is_finite_and_matches_float64(iterations, name):
    tensors, allowed, valid = extreme_case(torch.float32, seed=iterations)
    out = route(tensors, allowed, valid, iterations, name)
    assert torch.isfinite(out).all()
    expected = reference(tensors, allowed, valid, iterations)
    rows = valid.expand_as(out)
    # float32 potentials of size PEAK carry an absolute rounding of eps·PEAK into every logit
    tolerance = 16 * torch.finfo(torch.float32).eps * PEAK
    torch.testing.assert_close(out[rows], expected[rows].float(), rtol=0, atol=tolerance)
    grads = torch.autograd.grad((out * torch.randn_like(out)).sum(), tensors)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("iterations", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("name", ROUTES)
def test_float64_at_scores_of_1e4_equals_autograd_through_the_reference(iterations, name):
    tensors, allowed, valid = extreme_case(torch.float64, seed=10 + iterations)
    out = route(tensors, allowed, valid, iterations, name)
    expected = reference(tensors, allowed, valid, iterations)
    assert torch.isfinite(out).all() and torch.isfinite(expected).all()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)
    upstream = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad((out * upstream).sum(), tensors)
    wanted = torch.autograd.grad((expected * upstream).sum(), tensors)
    for mine, theirs in zip(got, wanted, strict=True):
        assert torch.isfinite(mine).all()
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-9 * max(1.0, theirs.abs().max().item()))


@pytest.mark.parametrize(
    ("iterations", "padded_queries"), [(2, False), (3, False), (4, False), (5, False), (3, True), (5, True)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_streaming_at_scores_of_1e4_matches_the_reference(iterations, padded_queries, dtype):
    """The streaming route's kernel domain, whose two shifts (and the padded queries' own row shift, for odd K)
    keep every block of E within range, gives the log-domain reference at ±1e4, padded keys and queries."""
    tensors, allowed, valid = extreme_case(dtype, seed=20 + iterations)
    valid = valid if padded_queries else None
    out = route(tensors, allowed, valid, iterations, "streaming")
    expected = reference(tensors, allowed, valid, iterations)
    tolerance = 16 * torch.finfo(torch.float32).eps * PEAK if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(out, expected.to(dtype), rtol=0, atol=tolerance)
    upstream = torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad((out * upstream).sum(), tensors)
    wanted = torch.autograd.grad((expected * upstream.double()).sum(), tensors)
    for mine, theirs in zip(got, wanted, strict=True):
        assert torch.isfinite(mine).all()
        if dtype == torch.float64:
            torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-9 * max(1.0, theirs.abs().max().item()))


def test_log_marginals_are_computed_in_the_input_dtype():
    allowed = torch.ones(1, 1, 7, 3, dtype=torch.bool)
    valid = torch.ones(1, 1, 7, 1, dtype=torch.bool)
    _, _, log_target = log_marginals(allowed, valid, torch.float64)
    assert log_target.dtype == torch.float64
    assert log_target.item() == math.log(7 / 3)
    q = torch.randn(1, 1, 7, 2, dtype=torch.float64)
    k = torch.randn(1, 1, 3, 2, dtype=torch.float64)
    column_sums = sinkhorn(q @ k.transpose(-1, -2), iterations=2).sum(-2)
    torch.testing.assert_close(column_sums, torch.full_like(column_sums, 7 / 3), rtol=0, atol=1e-15)


@pytest.mark.parametrize("iterations", [2, 3, 4])
@pytest.mark.parametrize("streaming", [False, True])
def test_a_padded_bert_with_huge_query_weights_stays_finite(iterations, streaming):
    """The report: MiniLM with query weights ×1e3 gave NaN loss, states and gradients at even K."""
    tiny = make_tiny("bert", "sinkhorn", sinkhorn_iterations=iterations, sinkhorn_streaming=streaming)
    sharpen(tiny, 3e4)  # random tiny weights: this many gives scores of order 1e4, as ×1e3 did for MiniLM
    states = tiny.model(**tiny.inputs).last_hidden_state
    assert torch.isfinite(states).all()
    states[tiny.valid].square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in tiny.model.parameters() if p.grad is not None)
