"""The Sinkhorn potentials Function (custom backward, dense and streaming blocks) against plain autograd
through the reference loop of sinkhorn.py, in float64."""

import pytest
import torch

from sinkhorn_hf.attention.implicit import ImplicitSolver
from sinkhorn_hf.attention.potentials import PotentialOptions, potentials
from sinkhorn_hf.attention.sinkhorn import MASKED_LOGIT, sinkhorn_potentials

SCALE = 0.7
EXACT = ImplicitSolver(ridge=1e-13, tolerance=1e-13, max_iterations=500)


def problem(seed=0, lengths=(7, 5), heads=3, dim=4, spread=1.0):
    """Padded self-attention in float64: q, k (B, H, N, D), a learnable (B, 1, N, N) bias, BERT-style masks."""
    generator = torch.Generator().manual_seed(seed)
    n = max(lengths)
    q = (torch.randn(len(lengths), heads, n, dim, generator=generator, dtype=torch.float64) * spread).requires_grad_()
    k = torch.randn(len(lengths), heads, n, dim, generator=generator, dtype=torch.float64).requires_grad_()
    bias = torch.randn(len(lengths), 1, n, n, generator=generator, dtype=torch.float64).requires_grad_()
    valid = torch.arange(n)[None] < torch.tensor(lengths)[:, None]
    allowed = valid[:, None, None, :].expand(len(lengths), 1, n, n)
    return q, k, bias, allowed, valid[:, None, :, None]


def reference_iterates(q, k, bias, allowed, query_valid, steps, tolerance=None):
    """Every iterate by plain autograd through the reference loop (row potentials, column potentials)."""
    scores = q @ k.transpose(-1, -2) * SCALE + bias
    us, vs = [], []
    for step in range(1, steps + 1):
        u, v = sinkhorn_potentials(scores, allowed, query_valid, step, tolerance)
        (us if step % 2 else vs).append(u if step % 2 else v)
    return us, vs


def weighted(us, vs, seed=1):
    generator = torch.Generator().manual_seed(seed)
    total = 0
    for iterate in list(us) + list(vs):
        total = total + (iterate * torch.randn(iterate.shape, generator=generator, dtype=iterate.dtype)).sum()
    return total


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("block_size", [None, 3, 1], ids=["dense", "blocks3", "blocks1"])
def test_iterates_and_unrolled_gradient_match_autograd(steps, block_size):
    q, k, bias, allowed, query_valid = problem()
    options = PotentialOptions(scale=SCALE, steps=steps, block_size=block_size)
    u_all, v_all = potentials(q, k, bias, allowed, query_valid, options)
    us, vs = reference_iterates(q, k, bias, allowed, query_valid, steps)
    assert len(u_all) == len(us) and len(v_all) == len(vs)
    for mine, theirs in zip(list(u_all) + list(v_all), us + vs):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-12)
    got = torch.autograd.grad(weighted(u_all, v_all), (q, k, bias))
    expected = torch.autograd.grad(weighted(us, vs), (q, k, bias))
    for mine, theirs in zip(got, expected):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6 * theirs.abs().max())


@pytest.mark.parametrize("block_size", [None, 2])
def test_tolerance_freezing_is_differentiated_like_the_reference(block_size):
    q, k, bias, allowed, query_valid = problem(seed=3, spread=1.0)
    steps, tolerance = 9, 0.05
    u_all, v_all = potentials(
        q, k, bias, allowed, query_valid, PotentialOptions(SCALE, steps, tolerance, block_size=block_size)
    )
    us, vs = reference_iterates(q, k, bias, allowed, query_valid, steps, tolerance)
    # the case must freeze some (batch, head) entries before the end and not others
    frozen = (v_all[-1] == v_all[-2]).all(-1).flatten()
    assert frozen.any() and not frozen.all()
    for mine, theirs in zip(list(u_all) + list(v_all), us + vs):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-12)
    got = torch.autograd.grad(weighted(u_all, v_all), (q, k, bias))
    expected = torch.autograd.grad(weighted(us, vs), (q, k, bias))
    for mine, theirs in zip(got, expected):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6 * theirs.abs().max())


@pytest.mark.parametrize("block_size", [None, 3])
def test_implicit_gradient_is_the_converged_gradient(block_size):
    """At convergence, implicit differentiation equals backprop through many steps (both of the plan)."""
    q, k, bias, allowed, query_valid = problem(seed=4)
    steps = 400
    weights = torch.randn(2, 3, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def loss(u, v):
        logits = torch.where(allowed, q @ k.transpose(-1, -2) * SCALE + bias + u + v, MASKED_LOGIT)
        return (logits.exp() * weights).sum()

    scores = q @ k.transpose(-1, -2) * SCALE + bias
    expected = torch.autograd.grad(loss(*sinkhorn_potentials(scores, allowed, query_valid, steps)), (q, k, bias))
    options = PotentialOptions(SCALE, steps, backward="implicit", block_size=block_size, solver=EXACT)
    u_all, v_all = potentials(q, k, bias, allowed, query_valid, options)
    got = torch.autograd.grad(loss(u_all[-1], v_all[-1]), (q, k, bias))
    for mine, theirs in zip(got, expected):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6 * theirs.abs().max())
    # and it differs from the unrolled gradient at a small K (it is a different estimator there)
    few = PotentialOptions(SCALE, 3, backward="implicit", solver=EXACT)
    u3, v3 = potentials(q, k, bias, allowed, query_valid, few)
    implicit3 = torch.autograd.grad(loss(u3[-1], v3[-1]), q)[0]
    u3, v3 = potentials(q, k, bias, allowed, query_valid, PotentialOptions(SCALE, 3))
    unrolled3 = torch.autograd.grad(loss(u3[-1], v3[-1]), q)[0]
    assert not torch.allclose(implicit3, unrolled3, atol=1e-4)


@pytest.mark.parametrize("block_size", [None, 2])
@pytest.mark.parametrize("steps", [3, 4])
def test_gradcheck_unrolled(steps, block_size):
    q, k, bias, allowed, query_valid = problem(seed=6, lengths=(4, 3), heads=1, dim=2)
    options = PotentialOptions(SCALE, steps, block_size=block_size)
    assert torch.autograd.gradcheck(lambda *x: potentials(*x, allowed, query_valid, options), (q, k, bias))


def test_gradcheck_implicit_at_convergence():
    q, k, bias, allowed, query_valid = problem(seed=7, lengths=(4, 3), heads=1, dim=2)
    options = PotentialOptions(SCALE, 300, backward="implicit", solver=EXACT)

    def plan(*x):  # potentials are defined up to a constant shift; the plan is not
        u_all, v_all = potentials(*x, allowed, query_valid, options)
        return torch.where(allowed, x[0] @ x[1].transpose(-1, -2) * SCALE + x[2] + u_all[-1] + v_all[-1], -50).exp()

    assert torch.autograd.gradcheck(plan, (q, k, bias), atol=1e-6)


def test_fully_masked_row_has_finite_gradient():
    q, k, bias, _, _ = problem(seed=8, lengths=(5,))
    allowed = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    allowed[..., 2, :] = False
    query_valid = torch.ones(1, 1, 5, 1, dtype=torch.bool)
    for block_size in (None, 2):
        u_all, v_all = potentials(q, k, bias, allowed, query_valid, PotentialOptions(SCALE, 4, block_size=block_size))
        assert torch.all(u_all[:, ..., 2, :] == 0)
        grads = torch.autograd.grad(weighted(u_all, v_all), (q, k, bias))
        assert all(torch.isfinite(g).all() for g in grads)


def _saved_bytes(fn) -> int:
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return total


def test_saved_state_does_not_grow_with_steps():
    n = 32
    q, k, bias, allowed, query_valid = problem(seed=9, lengths=(n, n - 5), heads=2, dim=8)
    batch_heads = 4

    def run(steps, mine):
        if mine:
            return lambda: potentials(q, k, bias, allowed, query_valid, PotentialOptions(SCALE, steps))
        return lambda: sinkhorn_potentials(q @ k.transpose(-1, -2) * SCALE + bias, allowed, query_valid, steps)

    growth = _saved_bytes(run(21, True)) - _saved_bytes(run(3, True))
    assert growth <= 18 * batch_heads * n * 8 * 1.01, "only the extra potentials (O(K·N)) may be saved"
    reference_growth = _saved_bytes(run(21, False)) - _saved_bytes(run(3, False))
    assert reference_growth >= 18 * batch_heads * n * n * 8, "plain autograd keeps an N×N matrix per step"


def test_bad_backward_mode_is_refused():
    q, k, bias, allowed, query_valid = problem()
    with pytest.raises(ValueError, match=r"backward must be one of \('unrolled', 'implicit'\), got 'exact'"):
        potentials(q, k, bias, allowed, query_valid, PotentialOptions(SCALE, 3, backward="exact"))
