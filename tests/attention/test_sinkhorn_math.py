"""The Sinkhorn maths against independent references: SoftMax, and a brute-force float64 Sinkhorn run on the
valid block alone in the probability domain."""

import pytest
import torch

from sinkhorn_hf.attention import log_sinkhorn, sinkhorn, sinkhorn_potentials


def brute_force(scores: torch.Tensor, iterations: int) -> torch.Tensor:
    """Sinkhorn on a (Lq, Lk) block in float64: alternate row division and column rescaling, rows first."""
    p = scores.double().exp()
    n_q, n_k = p.shape
    for step in range(iterations):
        if step % 2 == 0:
            p = p / p.sum(-1, keepdim=True)
        else:
            p = p * (n_q / n_k) / p.sum(-2, keepdim=True)
    return p


def padded_support(lengths, n):
    """Self-attention masks as BERT-family models give them: padded keys masked, padded queries not."""
    valid = torch.arange(n)[None] < torch.tensor(lengths)[:, None]  # (B, N)
    allowed = valid[:, None, None, :].expand(len(lengths), 1, n, n)
    return valid, allowed, valid[:, None, :, None]


@pytest.mark.parametrize("iterations", [1, 2, 3, 4, 7])
def test_matches_brute_force_on_valid_block(iterations):
    torch.manual_seed(0)
    lengths, n = (5, 8, 3), 8
    scores = torch.randn(3, 2, n, n, dtype=torch.float64) * 2
    valid, allowed, query_valid = padded_support(lengths, n)
    attention = sinkhorn(scores, allowed, query_valid, iterations)
    for b, length in enumerate(lengths):
        for h in range(2):
            expected = brute_force(scores[b, h, :length, :length], iterations)
            torch.testing.assert_close(attention[b, h, :length, :length], expected, rtol=1e-10, atol=1e-12)
        assert torch.all(attention[b, :, :, length:] == 0), "padded keys must carry exactly zero weight"
        assert torch.isfinite(attention[b]).all()


def test_one_iteration_is_softmax_with_mask():
    torch.manual_seed(1)
    scores = torch.randn(2, 3, 6, 6)
    _, allowed, query_valid = padded_support((6, 4), 6)
    expected = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    torch.testing.assert_close(sinkhorn(scores, allowed, query_valid, 1), expected, rtol=1e-6, atol=1e-7)


def test_rectangular_marginals():
    torch.manual_seed(2)
    scores = torch.randn(2, 5, 9)
    attention = sinkhorn(scores, iterations=201)
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 5))
    torch.testing.assert_close(attention.sum(-2), torch.full((2, 9), 5 / 9))
    for b in range(2):
        torch.testing.assert_close(attention[b].double(), brute_force(scores[b], 201), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("iterations", [51, 52])
def test_many_iterations_doubly_stochastic_over_valid_tokens(iterations):
    torch.manual_seed(3)
    lengths, n = (10, 6), 10
    scores = torch.randn(2, 4, n, n)
    valid, allowed, query_valid = padded_support(lengths, n)
    attention = sinkhorn(scores, allowed, query_valid, iterations)
    for b, length in enumerate(lengths):
        block = attention[b, :, :length, :length]
        torch.testing.assert_close(block.sum(-1), torch.ones(4, length), atol=1e-3, rtol=0)
        torch.testing.assert_close(block.sum(-2), torch.ones(4, length), atol=1e-3, rtol=0)


def test_padding_does_not_change_valid_block():
    torch.manual_seed(4)
    scores = torch.randn(1, 2, 9, 9)
    _, allowed, query_valid = padded_support((6,), 9)
    padded = sinkhorn(scores, allowed, query_valid, 5)
    alone = sinkhorn(scores[..., :6, :6], iterations=5)
    torch.testing.assert_close(padded[..., :6, :6], alone, rtol=0, atol=1e-6)


def test_fully_masked_row_gives_zeros_and_finite_gradient():
    scores = torch.randn(1, 1, 4, 4, requires_grad=True)
    allowed = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    allowed[..., 2, :] = False
    attention = sinkhorn(scores, allowed, torch.ones(1, 1, 4, 1, dtype=torch.bool), 4)
    assert torch.all(attention[..., 2, :] == 0)
    assert torch.isfinite(attention).all()
    (attention * torch.randn_like(attention)).sum().backward()
    assert torch.isfinite(scores.grad).all()


def test_gradcheck_float64_with_padding():
    torch.manual_seed(5)
    scores = torch.randn(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    _, allowed, query_valid = padded_support((4, 3), 4)
    assert torch.autograd.gradcheck(lambda s: log_sinkhorn(s, allowed, query_valid, 4).exp(), (scores,))


def test_tolerance_stops_early_and_meets_it():
    torch.manual_seed(6)
    scores = torch.randn(3, 2, 8, 8) * 3
    full = sinkhorn(scores, iterations=61)
    stopped = sinkhorn(scores, iterations=61, tolerance=1e-2)
    column_error = (stopped.sum(-2) - 1).abs().amax()
    assert column_error <= 1e-2
    torch.testing.assert_close(stopped.sum(-1), torch.ones(3, 2, 8))  # stops after a row step
    assert not torch.allclose(stopped, full, atol=1e-5), "a loose tolerance must stop before convergence"
    # every (batch, head) stopped at the first odd K whose column error was within tolerance
    for b in range(3):
        for h in range(2):
            for k in range(1, 62, 2):
                candidate = sinkhorn(scores[b, h], iterations=k)
                if (candidate.sum(-2) - 1).abs().amax() <= 1e-2:
                    torch.testing.assert_close(stopped[b, h], candidate)
                    break


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, None])
def test_bad_iterations_rejected(bad):
    with pytest.raises(ValueError, match="iterations must be an int >= 1"):
        sinkhorn_potentials(
            torch.zeros(1, 2, 2), torch.ones(1, 2, 2, dtype=torch.bool), torch.ones(1, 2, 1, dtype=torch.bool), bad
        )
