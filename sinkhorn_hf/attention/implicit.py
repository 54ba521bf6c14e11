"""Implicit differentiation of converged Sinkhorn potentials (the approach of OTT-JAX and FlashSinkhorn).

At convergence (u, v) solve r = u + lse_k(S + v) = 0 and c = v + lse_q(S + u) - log t = 0. With the plan
P = exp(S + u + v) on the support and Qc = P / t on valid query rows, the adjoint system Jᵀλ = (ḡ_u, ḡ_v) reduces
to the Schur complement (I - Pᵀ Qc + ridge·I) λ_v = ḡ_v - Pᵀ ḡ_u, solved by conjugate gradient with only P·x and
Pᵀ·y products; then λ_u = ḡ_u - Qc λ_v and dS = -(λ_u 1ᵀ ⊙ P + 1 λ_vᵀ ⊙ Qc).
The matrix is symmetric positive semi-definite; its null direction (constant shifts of v over the columns with
mass) does not change dS at convergence, so λ_v is sought orthogonal to it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .scores import MarginalSupport, Plan
from .settings import ImplicitSolver

__all__ = ["ImplicitSolver", "conjugate_gradient", "implicit_terms"]


def conjugate_gradient(
    operator: Callable[[Tensor], Tensor], rhs: Tensor, tolerance: float, max_iterations: int
) -> Tensor:
    """Solve operator(x) = rhs for a batch of symmetric positive (semi-)definite systems along the last dim.

    Always ``max_iterations`` steps: a system whose residual is within ``tolerance`` of its right-hand side stops
    moving (masked on device), so there is no data-dependent exit and no host synchronisation."""
    x = torch.zeros_like(rhs)
    residual = rhs.clone()
    direction = residual.clone()
    norm = (residual * residual).sum(-1, keepdim=True)
    goal = norm * tolerance**2
    tiny = torch.finfo(norm.dtype).tiny
    for _ in range(max_iterations):
        active = norm > goal
        image = operator(direction)
        curvature = (direction * image).sum(-1, keepdim=True)
        step = torch.where(active & (curvature > 0), norm / curvature.clamp(min=tiny), 0.0)
        x = x + step * direction
        residual = residual - step * image
        new_norm = (residual * residual).sum(-1, keepdim=True)
        ratio = torch.where(norm > 0, new_norm / norm.clamp(min=tiny), 0.0)
        direction = torch.where(active, residual + ratio * direction, direction)  # a stopped system stays put
        norm = new_norm
    return x


def implicit_terms(plan: Plan, grad_u: Tensor, grad_v: Tensor, support: MarginalSupport, solver: ImplicitSolver):
    """Gradient w.r.t. S through converged potentials, as terms (plan, left, right) with
    dS = -Σ plan ⊙ left rightᵀ (None = ones).

    ``plan``: P = exp(S + u + v) on the row support; grad_u (..., Lq, 1) and grad_v (..., 1, Lk) are the
    gradients of the potentials.
    """
    dtype, device = grad_u.dtype, grad_u.device
    inv_target = torch.exp(-torch.as_tensor(support.log_target, dtype=dtype, device=device))
    valid = support.query_valid
    # Qc = diag(row_weight) P: valid query rows, divided by the column target t.
    row_weight = inv_target.expand(*grad_u.shape[:-2], 1, 1) if valid is None else valid.to(dtype) * inv_target
    mass = support.column_has_mass
    count = grad_v.shape[-1] if mass is None else mass.sum(-1, keepdim=True).clamp(min=1)

    def gauge(x: Tensor) -> Tensor:
        """Remove the mean over columns with mass: the null direction of the system at convergence. Away from
        convergence it is only nearly null; fixing it keeps the solve well conditioned and lets padded columns
        (decoupled, identity rows) leave the answer unchanged."""
        if mass is None:
            return x - x.mean(-1, keepdim=True)
        return x - (x.masked_fill(~mass, 0.0).sum(-1, keepdim=True) / count).masked_fill(~mass, 0.0)

    def schur(x: Tensor) -> Tensor:  # (I - Pᵀ Qc + ridge) x on the gauge subspace
        return gauge(x * (1 + solver.ridge) - plan.gram(x, row_weight))

    rhs = gauge(grad_v - plan.rtimes(grad_u))
    lambda_v = conjugate_gradient(schur, rhs, solver.tolerance, solver.max_iterations)
    lambda_u = grad_u - row_weight * plan.times(lambda_v)
    return [(plan, lambda_u, None), (plan, row_weight, lambda_v)]
