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

from .iterations import final_row_potential, half_steps, step_count
from .scores import MASKED_LOGIT, MarginalSupport
from .settings import check_iterations

__all__ = ["MASKED_LOGIT", "log_marginals", "log_sinkhorn", "sinkhorn", "sinkhorn_potentials"]


def log_marginals(
    allowed: Tensor, query_valid: Tensor, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor, Tensor]:
    """Support of the column step and the log target of each column.

    ``allowed`` (..., Lq, Lk) bool, ``query_valid`` (..., Lq, 1) bool. Returns ``column_allowed``
    (allowed entries of valid query rows), ``column_has_mass`` (..., 1, Lk) and ``log_column_target``
    (..., 1, 1) = log(n_q / n_k) in ``dtype``, counted over valid rows and over columns that carry mass.
    """
    column_allowed = allowed & query_valid
    column_has_mass = column_allowed.any(dim=-2, keepdim=True)
    n_q = query_valid.sum(dim=-2, keepdim=True).clamp(min=1)
    n_k = column_has_mass.sum(dim=-1, keepdim=True).clamp(min=1)
    return column_allowed, column_has_mass, (n_q.to(dtype) / n_k.to(dtype)).log()


def sinkhorn_potentials(
    scores: Tensor,
    allowed: Tensor,
    query_valid: Tensor,
    iterations: int,
    tolerance: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Potentials after ``iterations`` half-steps (odd steps rows, even steps columns), on the whole scores.

    scores (..., Lq, Lk) float; allowed (..., Lq, Lk) bool; query_valid (..., Lq, 1) bool.
    Returns u (..., Lq, 1) and v (..., 1, Lk) with log A = S + u + v on the support:
    u = -lse_k(S + v) over allowed keys, v = log t - lse_q(S + u) over valid queries; for even K the rows
    outside the column marginals take one more row step (they stay normalised, see ``final_row_potential``).
    ``tolerance``: a batch/head entry stops updating once the column sums it would correct are within
    ``tolerance`` of their target (checked on device, so no host synchronisation per step).
    """
    check_iterations(iterations, "iterations")
    column_allowed, column_has_mass, log_target = log_marginals(allowed, query_valid, scores.dtype)
    support = MarginalSupport(allowed.any(dim=-1, keepdim=True), column_has_mass, query_valid, log_target)

    def row_lse(v: Tensor) -> Tensor:
        return torch.where(allowed, scores + v, MASKED_LOGIT).logsumexp(dim=-1, keepdim=True)

    def column_lse(u: Tensor) -> Tensor:
        return torch.where(column_allowed, scores + u, MASKED_LOGIT).logsumexp(dim=-2, keepdim=True)

    u = scores.new_zeros(scores.shape[:-1] + (1,))
    v = scores.new_zeros(scores.shape[:-2] + (1, scores.shape[-1]))
    steps = step_count(iterations, query_valid)
    us, vs, _ = half_steps(steps, row_lse, column_lse, u, v, support, tolerance)
    return final_row_potential(us, iterations, query_valid), vs[-1] if vs else v


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
