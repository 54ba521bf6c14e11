"""Implicit differentiation of converged Sinkhorn potentials (the approach of OTT-JAX and FlashSinkhorn).

At convergence (u, v) solve r = u + lse_k(S + v) = 0 and c = v + lse_q(S + u) - log t = 0. With the plan
P = exp(S + u + v) on the support and Qc = P / t on valid query rows, the adjoint system Jᵀλ = (ḡ_u, ḡ_v) reduces
to the Schur complement (I - Pᵀ Qc + ridge·I) λ_v = ḡ_v - Pᵀ ḡ_u, solved by conjugate gradient with only P·x and
Pᵀ·y products; then λ_u = ḡ_u - Qc λ_v and dS = -(λ_u 1ᵀ ⊙ P + 1 λ_vᵀ ⊙ Qc).
The matrix is symmetric positive semi-definite; its null direction (constant shifts of v) does not change dS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .streaming import ScoreBlocks


@dataclass(frozen=True)
class ImplicitSolver:
    """Conjugate gradient settings: ``ridge`` added to the diagonal, stop when every system's residual is below
    ``tolerance`` times its right-hand side, or after ``max_iterations``."""

    ridge: float = 1e-6
    tolerance: float = 1e-6
    max_iterations: int = 100


def conjugate_gradient(
    operator: Callable[[Tensor], Tensor], rhs: Tensor, tolerance: float, max_iterations: int
) -> Tensor:
    """Solve operator(x) = rhs for a batch of symmetric positive (semi-)definite systems along the last dim."""
    x = torch.zeros_like(rhs)
    residual = rhs.clone()
    direction = residual.clone()
    norm = (residual * residual).sum(-1, keepdim=True)
    goal = norm * tolerance**2
    for _ in range(max_iterations):
        active = norm > goal
        if not bool(active.any()):
            break
        image = operator(direction)
        curvature = (direction * image).sum(-1, keepdim=True)
        step = torch.where(active & (curvature > 0), norm / curvature.clamp(min=torch.finfo(norm.dtype).tiny), 0.0)
        x = x + step * direction
        residual = residual - step * image
        new_norm = (residual * residual).sum(-1, keepdim=True)
        ratio = torch.where(norm > 0, new_norm / norm.clamp(min=torch.finfo(norm.dtype).tiny), 0.0)
        direction = residual + ratio * direction
        norm = new_norm
    return x


def implicit_grad_scores(
    blocks: ScoreBlocks, u: Tensor, v: Tensor, grad_u: Tensor, grad_v: Tensor, solver: ImplicitSolver
) -> Callable[[int], Tensor]:
    """Gradient of the loss w.r.t. S through converged potentials u (..., Lq, 1), v (..., 1, Lk), given their
    gradients. Returns a function block index -> dS block (..., rows, Lk)."""
    valid = blocks.query_valid
    inv_target = torch.exp(-torch.as_tensor(blocks.log_target, dtype=u.dtype, device=u.device))
    kept = [None] * len(blocks.slices)

    def plan(block: int) -> Tensor:
        if kept[block] is not None:
            return kept[block]
        out = blocks.logits(block, u, v, column=False).exp_()
        if blocks.dense:
            kept[block] = out
        return out

    def valid_mask(block: int) -> Tensor | None:
        return valid if valid is None or valid.shape[-2] == 1 else valid[..., blocks.slices[block], :]

    def valid_rows(y: Tensor, block: int) -> Tensor:
        rows = valid_mask(block)
        return y if rows is None else y.masked_fill(~rows, 0.0)

    def transposed_product(y: Tensor) -> Tensor:  # Pᵀ y: (..., Lq, 1) -> (..., 1, Lk)
        total = 0
        for block, rows in enumerate(blocks.slices):
            total = total + torch.matmul(y[..., rows, :].transpose(-1, -2), plan(block))
        return total

    def schur(x: Tensor) -> Tensor:  # (I - Pᵀ Qc + ridge) x, one pass over the blocks
        total = 0
        for block in range(len(blocks.slices)):
            p = plan(block)
            image = valid_rows(torch.matmul(p, x.transpose(-1, -2)), block) * inv_target
            total = total + torch.matmul(image.transpose(-1, -2), p)
        return x * (1 + solver.ridge) - total

    grad_v = grad_v.expand_as(v)
    rhs = grad_v - transposed_product(grad_u)
    lambda_v = conjugate_gradient(schur, rhs, solver.tolerance, solver.max_iterations)
    image = torch.cat(
        [valid_rows(torch.matmul(plan(b), lambda_v.transpose(-1, -2)), b) for b in range(len(blocks.slices))], -2
    )
    lambda_u = grad_u - image * inv_target
    column_weight = lambda_v * inv_target

    def grad_block(block: int) -> Tensor:
        rows = blocks.slices[block]
        mask = valid_mask(block)
        weight = column_weight if mask is None else torch.where(mask, column_weight, 0.0)
        return plan(block).mul(weight + lambda_u[..., rows, :]).neg_()

    return grad_block
