"""Log-domain Sinkhorn normalisation of attention scores (Sinkformers, Sander et al., AISTATS 2022).

Scores ``S`` of shape ``(..., Lq, Lk)`` are turned into ``A = exp(S + u 1ᵀ + 1 vᵀ)`` by alternately
setting the row potential ``u`` (rows sum to 1) and the column potential ``v`` (valid columns sum to
``n_q / n_k``), rows first. One row step is exactly SoftMax. Entries outside the support carry exactly
zero mass, and padded query rows are left out of the column marginals so that the valid block is doubly
stochastic. Nothing here knows about transformers.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Finite on purpose: exp() of it is exactly 0 in float32/64, and unlike -inf it never produces
# inf - inf = NaN in a logsumexp (or its gradient) over a fully masked row.
MASKED_LOGIT = -1e30


def _check_iterations(iterations: int) -> None:
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"sinkhorn iterations must be an int >= 1 (1 is SoftMax), got {iterations!r}")


def log_marginals(allowed: Tensor, query_valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Support of the column step and the log target of each column.

    ``allowed`` (..., Lq, Lk) bool, ``query_valid`` (..., Lq, 1) bool. Returns ``column_allowed``
    (allowed entries of valid query rows), ``column_has_mass`` (..., 1, Lk) and ``log_column_target``
    (..., 1, 1) = log(n_q / n_k), counted over valid rows and over columns that carry mass.
    """
    column_allowed = allowed & query_valid
    column_has_mass = column_allowed.any(dim=-2, keepdim=True)
    n_q = query_valid.sum(dim=-2, keepdim=True).clamp(min=1)
    n_k = column_has_mass.sum(dim=-1, keepdim=True).clamp(min=1)
    return column_allowed, column_has_mass, (n_q.float() / n_k.float()).log()


def sinkhorn_potentials(
    scores: Tensor,
    allowed: Tensor,
    query_valid: Tensor,
    iterations: int,
    tolerance: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Potentials after ``iterations`` half-steps (odd steps rows, even steps columns).

    scores (..., Lq, Lk) float; allowed (..., Lq, Lk) bool; query_valid (..., Lq, 1) bool.
    Returns u (..., Lq, 1) and v (..., 1, Lk) with log A = S + u + v on the support.
    ``tolerance``: a batch/head entry stops updating once the column sums it would correct are within
    ``tolerance`` of their target (checked on device, so no host synchronisation per step).
    """
    _check_iterations(iterations)
    column_allowed, column_has_mass, log_target = log_marginals(allowed, query_valid)
    row_has_mass = allowed.any(dim=-1, keepdim=True)
    u = scores.new_zeros(scores.shape[:-1] + (1,))
    v = scores.new_zeros(scores.shape[:-2] + (1, scores.shape[-1]))
    converged = None
    for step in range(iterations):
        if step % 2 == 0:
            lse = torch.where(allowed, scores + v, MASKED_LOGIT).logsumexp(dim=-1, keepdim=True)
            new_u = torch.where(row_has_mass, -lse, 0.0)
            u = new_u if converged is None else torch.where(converged, u, new_u)
        else:
            lse = torch.where(column_allowed, scores + u, MASKED_LOGIT).logsumexp(dim=-2, keepdim=True)
            if tolerance is not None:
                # column sums of the current state are exp(lse + v)
                error = torch.where(column_has_mass, (lse + v - log_target).exp() - 1, 0.0).abs()
                now = error.amax(dim=-1, keepdim=True) <= tolerance
                converged = now if converged is None else converged | now
            new_v = torch.where(column_has_mass, log_target - lse, 0.0)
            v = new_v if converged is None else torch.where(converged, v, new_v)
    return u, v


def log_sinkhorn(
    scores: Tensor,
    allowed: Tensor | None = None,
    query_valid: Tensor | None = None,
    iterations: int = 3,
    tolerance: float | None = None,
) -> Tensor:
    """log A (..., Lq, Lk), with ``MASKED_LOGIT`` outside the support. ``iterations=1`` is log-softmax.

    ``allowed`` defaults to everything, ``query_valid`` to every query row.
    """
    if allowed is None:
        allowed = torch.ones((), dtype=torch.bool, device=scores.device).expand(scores.shape)
    if query_valid is None:
        query_valid = torch.ones((), dtype=torch.bool, device=scores.device).expand(scores.shape[:-1] + (1,))
    u, v = sinkhorn_potentials(scores, allowed, query_valid, iterations, tolerance)
    return torch.where(allowed, scores + u + v, MASKED_LOGIT)


def sinkhorn(
    scores: Tensor,
    allowed: Tensor | None = None,
    query_valid: Tensor | None = None,
    iterations: int = 3,
    tolerance: float | None = None,
) -> Tensor:
    """Attention matrix A = exp(log_sinkhorn(...)) of shape (..., Lq, Lk); zero outside the support."""
    return log_sinkhorn(scores, allowed, query_valid, iterations, tolerance).exp()
