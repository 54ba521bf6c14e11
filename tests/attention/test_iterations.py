"""The half-steps on score blocks and their reverse sweeps (unrolled, implicit) against plain autograd through
the reference loop of sinkhorn.py, in float64."""

import pytest
import torch

from sinkhorn_hf.attention.implicit import ImplicitSolver, implicit_terms
from sinkhorn_hf.attention.iterations import block_half_steps, grad_block, step_plans, unrolled_terms
from sinkhorn_hf.attention.scores import ScoreBlocks
from sinkhorn_hf.attention.sinkhorn import MASKED_LOGIT, sinkhorn_potentials

SCALE = 0.7
EXACT = ImplicitSolver(ridge=1e-13, tolerance=1e-13, max_iterations=500)


def problem(seed=0, lengths=(7, 5), heads=3, dim=4, spread=1.0):
    """Padded self-attention in float64: q, k (B, H, N, D), a (B, 1, N, N) bias, BERT-style masks."""
    generator = torch.Generator().manual_seed(seed)
    n = max(lengths)
    q = torch.randn(len(lengths), heads, n, dim, generator=generator, dtype=torch.float64) * spread
    k = torch.randn(len(lengths), heads, n, dim, generator=generator, dtype=torch.float64)
    bias = torch.randn(len(lengths), 1, n, n, generator=generator, dtype=torch.float64)
    valid = torch.arange(n)[None] < torch.tensor(lengths)[:, None]
    allowed = valid[:, None, None, :].expand(len(lengths), 1, n, n)
    return q, k, bias, allowed, valid[:, None, :, None]


def reference_iterates(scores, allowed, query_valid, steps, tolerance=None):
    us, vs = [], []
    for step in range(1, steps + 1):
        u, v = sinkhorn_potentials(scores, allowed, query_valid, step, tolerance)
        (us if step % 2 else vs).append(u if step % 2 else v)
    return us, vs


def weights_like(tensors, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(t.shape, generator=generator, dtype=t.dtype) for t in tensors]


BLOCKS = pytest.mark.parametrize("block_size", [None, 3, 1], ids=["dense", "blocks3", "blocks1"])


def block_grads(terms, blocks):
    """dS of the terms on every score block."""
    return [grad_block(terms, i, blocks.scratch(i).clone(), rows) for i, rows in enumerate(blocks.slices)]


@BLOCKS
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5])
def test_iterates_match_the_reference(steps, block_size):
    q, k, bias, allowed, query_valid = problem()
    blocks = ScoreBlocks(q, k, bias, allowed, query_valid, SCALE, block_size)
    us, vs, frozen = block_half_steps(blocks, steps, None)
    expected_us, expected_vs = reference_iterates(q @ k.transpose(-1, -2) * SCALE + bias, allowed, query_valid, steps)
    assert len(us) == len(expected_us) and len(vs) == len(expected_vs) and frozen == []
    for mine, theirs in zip(us + vs, expected_us + expected_vs, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("block_size", [None, 2])
def test_rectangular_without_masks(block_size):
    generator = torch.Generator().manual_seed(2)
    q, k = (torch.randn(2, 1, n, 3, generator=generator, dtype=torch.float64) for n in (5, 8))
    us, vs, _ = block_half_steps(ScoreBlocks(q, k, None, None, None, SCALE, block_size), 41, None)
    plan = (q @ k.transpose(-1, -2) * SCALE + us[-1] + vs[-1]).exp()
    torch.testing.assert_close(plan.sum(-1), torch.ones(2, 1, 5, dtype=torch.float64))
    torch.testing.assert_close(plan.sum(-2), torch.full((2, 1, 8), 5 / 8, dtype=torch.float64), atol=1e-6, rtol=0)


def _sweep_gradient(q, k, bias, allowed, query_valid, steps, block_size, tolerance=None, seed=1):
    """dS from the unrolled sweep of a random weighted sum of every iterate, and the same by autograd."""
    scores = (q @ k.transpose(-1, -2) * SCALE + bias).requires_grad_()
    blocks = ScoreBlocks(q, k, bias, allowed, query_valid, SCALE, block_size)
    us, vs, frozen = block_half_steps(blocks, steps, tolerance)
    grad_us, grad_vs = weights_like(us, seed), weights_like(vs, seed + 1)
    terms = unrolled_terms(step_plans(blocks.plan, us, vs, blocks.log_target), frozen, grad_us, grad_vs, blocks.support)
    mine = torch.cat(block_grads(terms, blocks), -2)
    expected_us, expected_vs = reference_iterates(scores, allowed, query_valid, steps, tolerance)
    loss = sum((a * w).sum() for a, w in zip(expected_us + expected_vs, grad_us + grad_vs, strict=True))
    return mine, torch.autograd.grad(loss, scores)[0], vs


@BLOCKS
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5])
def test_unrolled_sweep_is_the_autograd_gradient(steps, block_size):
    mine, expected, _ = _sweep_gradient(*problem(seed=3), steps, block_size)
    torch.testing.assert_close(mine, expected, rtol=0, atol=1e-6 * expected.abs().max())


@pytest.mark.parametrize("block_size", [None, 2])
def test_tolerance_freezing_is_differentiated_like_the_reference(block_size):
    q, k, bias, allowed, query_valid = problem(seed=3, spread=1.0)
    mine, expected, vs = _sweep_gradient(q, k, bias, allowed, query_valid, 9, block_size, tolerance=0.05)
    frozen = (vs[-1] == vs[-2]).all(-1).flatten()
    assert frozen.any() and not frozen.all(), "the case must freeze some (batch, head) entries and not others"
    torch.testing.assert_close(mine, expected, rtol=0, atol=1e-6 * expected.abs().max())


@pytest.mark.parametrize("block_size", [None, 3])
def test_implicit_terms_are_the_converged_gradient(block_size):
    """At convergence, implicit differentiation equals backprop through many steps (both of the plan)."""
    q, k, bias, allowed, query_valid = problem(seed=4)
    steps = 400
    weights = torch.randn(2, 3, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    scores = (q @ k.transpose(-1, -2) * SCALE + bias).requires_grad_()
    u, v = sinkhorn_potentials(scores, allowed, query_valid, steps)
    plan = torch.where(allowed, scores + u + v, MASKED_LOGIT).exp()
    (expected,) = torch.autograd.grad((plan * weights).sum(), scores)

    blocks = ScoreBlocks(q, k, bias, allowed, query_valid, SCALE, block_size)
    us, vs, _ = block_half_steps(blocks, steps, None)
    final = blocks.plan(us[-1], vs[-1], column=False)
    dense = torch.where(allowed, q @ k.transpose(-1, -2) * SCALE + bias + us[-1] + vs[-1], MASKED_LOGIT).exp()
    direct = dense * weights  # d(plan)/d(log plan), before the potentials' own dependence on S
    terms = implicit_terms(final, direct.sum(-1, keepdim=True), direct.sum(-2, keepdim=True), blocks.support, EXACT)
    mine = direct + torch.cat(block_grads(terms, blocks), -2)
    torch.testing.assert_close(mine, expected, rtol=0, atol=1e-6 * expected.abs().max())


def test_fully_masked_row_keeps_zero_potential_and_finite_gradient():
    q, k, bias, _, _ = problem(seed=8, lengths=(5,))
    allowed = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    allowed[..., 2, :] = False
    query_valid = torch.ones(1, 1, 5, 1, dtype=torch.bool)
    for block_size in (None, 2):
        blocks = ScoreBlocks(q, k, bias, allowed, query_valid, SCALE, block_size)
        us, vs, frozen = block_half_steps(blocks, 4, None)
        assert all(torch.all(u[..., 2, :] == 0) for u in us)
        plans = step_plans(blocks.plan, us, vs, blocks.log_target)
        terms = unrolled_terms(plans, frozen, weights_like(us), weights_like(vs), blocks.support)
        grads = block_grads(terms, blocks)
        assert all(torch.isfinite(g).all() for g in grads)
