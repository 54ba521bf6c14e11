"""Sinkhorn potentials as one autograd Function whose saved state does not grow with the number of steps.

Forward runs the half-steps of :func:`.sinkhorn.sinkhorn_potentials` (rows first) on score blocks
(:class:`.streaming.ScoreBlocks`) without recording a graph and returns every iterate. Backward rebuilds the
plans it needs from the saved potentials (O(K·N) numbers), either exactly through the K steps ("unrolled") or
by implicit differentiation of the converged optimality conditions ("implicit", :mod:`.implicit`).

A row step u = -lse_k(S + v) has Jacobian -P with P = exp(S + v + u) (rows sum to 1); a column step
v = log t - lse_q(S + u) has Jacobian -Q with Q = exp(S + u + v - log t) (valid columns sum to 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .implicit import ImplicitSolver, implicit_grad_scores
from .settings import BACKWARD_MODES
from .streaming import ScoreBlocks


@dataclass(frozen=True)
class PotentialOptions:
    """``steps`` half-steps (rows first); ``tolerance`` freezes converged (batch, head) entries; ``backward``
    one of BACKWARD_MODES; ``block_size`` queries per score block (None: dense)."""

    scale: float
    steps: int
    tolerance: float | None = None
    backward: str = "unrolled"
    block_size: int | None = None
    solver: ImplicitSolver = ImplicitSolver()


def _half_steps(blocks: ScoreBlocks, steps: int, tolerance: float | None):
    """Iterates of the K half-steps: u after each row step, v after each column step, and the converged mask
    (..., 1, 1) after each column step (None without a tolerance)."""
    dtype, device = blocks.query.dtype, blocks.query.device
    n_q, n_k = blocks.query.shape[-2], blocks.key.shape[-2]
    u = torch.zeros(*blocks.batch_shape, n_q, 1, dtype=dtype, device=device)
    v = torch.zeros(*blocks.batch_shape, 1, n_k, dtype=dtype, device=device)
    us, vs, frozen = [], [], []
    converged = None
    for step in range(steps):
        if step % 2 == 0:
            new_u = -blocks.row_lse(v)
            if blocks.row_has_mass is not None:
                new_u = new_u.masked_fill(~blocks.row_has_mass, 0.0)
            u = new_u if converged is None else torch.where(converged, u, new_u)
            us.append(u)
        else:
            lse = blocks.column_lse(u)
            if tolerance is not None:
                error = ((lse + v - blocks.log_target).exp() - 1).abs()
                if blocks.column_has_mass is not None:
                    error = error.masked_fill(~blocks.column_has_mass, 0.0)
                now = error.amax(dim=-1, keepdim=True) <= tolerance
                converged = now if converged is None else converged | now
                frozen.append(converged)
            new_v = blocks.log_target - lse
            if blocks.column_has_mass is not None:
                new_v = new_v.masked_fill(~blocks.column_has_mass, 0.0)
            v = new_v if converged is None else torch.where(converged, v, new_v)
            vs.append(v)
    return us, vs, frozen


def _unrolled_grad_scores(
    blocks: ScoreBlocks, us: list[Tensor], vs: list[Tensor], frozen: list[Tensor], grad_us: Tensor, grad_vs: Tensor
):
    """Reverse sweep through the half-steps. Returns a function block index -> dS block, or dS when dense."""
    n_steps = len(us) + len(vs)
    u_bar = torch.zeros_like(us[0])
    v_bar = torch.zeros_like(vs[0]) if vs else None
    grad_dense = torch.zeros_like(blocks.cached_scores) if blocks.dense else None
    terms = []  # (weight, row_shift, column_shift, column): dS = -Σ weight ⊙ plan(row_shift, column_shift)
    for step in reversed(range(n_steps)):
        index = step // 2
        if step % 2 == 0:  # u_index = -lse_k(S + v_{index-1}); P = exp(S + v_prev + u)
            u_bar = u_bar + grad_us[index]
            weight = u_bar if blocks.row_has_mass is None else u_bar.masked_fill(~blocks.row_has_mass, 0.0)
            keep = frozen[index - 1] if frozen and index > 0 else None
            if keep is None:
                u_bar = torch.zeros_like(u_bar)
            else:  # a frozen entry kept the previous u: its gradient flows there unchanged
                weight = weight.masked_fill(keep, 0.0)
                u_bar = u_bar.masked_fill(~keep, 0.0)
            row_shift, column_shift = us[index], (vs[index - 1] if index > 0 else 0.0)
            need_reduction = index > 0  # v_{-1} = 0 is a constant
            reduced = []
            for block in range(len(blocks.slices)):
                if not need_reduction and grad_dense is None:
                    break
                plan = blocks.logits(block, row_shift, column_shift, column=False).exp_()
                part = weight[..., blocks.slices[block], :]
                if need_reduction:
                    reduced.append(torch.matmul(part.transpose(-1, -2), plan))
                if grad_dense is not None:
                    grad_dense.addcmul_(plan, part, value=-1)
            if need_reduction:
                v_bar = v_bar - sum(reduced).sum_to_size(v_bar.shape)
            if grad_dense is None:
                terms.append((weight, row_shift, column_shift, False))
        else:  # v_index = log t - lse_q(S + u_index); Q = exp(S + u + v - log t)
            v_bar = v_bar + grad_vs[index]
            weight = v_bar if blocks.column_has_mass is None else v_bar.masked_fill(~blocks.column_has_mass, 0.0)
            keep = frozen[index] if frozen else None
            if keep is None:
                v_bar = torch.zeros_like(v_bar)
            else:
                weight = weight.masked_fill(keep, 0.0)
                v_bar = v_bar.masked_fill(~keep, 0.0)
            row_shift, column_shift = us[index], vs[index] - blocks.log_target
            parts = []
            for block in range(len(blocks.slices)):
                plan = blocks.logits(block, row_shift, column_shift, column=True).exp_()
                parts.append(torch.matmul(plan, weight.transpose(-1, -2)))
                if grad_dense is not None:
                    grad_dense.addcmul_(plan, weight, value=-1)
            u_bar = u_bar - torch.cat(parts, -2).sum_to_size(u_bar.shape)
            if grad_dense is None:
                terms.append((weight, row_shift, column_shift, True))
    if grad_dense is not None:
        return lambda block: grad_dense

    def grad_block(block: int) -> Tensor:
        rows = blocks.slices[block]
        total = None
        for weight, row_shift, column_shift, column in terms:
            plan = blocks.logits(block, row_shift, column_shift, column=column).exp_()
            part = weight if column else weight[..., rows, :]
            total = plan.mul_(part).neg_() if total is None else total.addcmul_(plan, part, value=-1)
        return total

    return grad_block


class SinkhornPotentials(torch.autograd.Function):
    """(query, key, bias, allowed, query_valid, options) -> (u_all (R, ..., Lq, 1), v_all (C, ..., 1, Lk)):
    the row potential after each row step and the column potential after each column step, R + C = steps.

    Saves query, key, bias, the masks, the iterates and (dense mode only) S: nothing that grows with K·N².
    """

    @staticmethod
    def forward(ctx, query, key, bias, allowed, query_valid, options: PotentialOptions):
        blocks = ScoreBlocks(query, key, bias, allowed, query_valid, options.scale, options.block_size)
        us, vs, frozen = _half_steps(blocks, options.steps, options.tolerance)
        ctx.options = options
        ctx.n_frozen = len(frozen)
        ctx.n_us = len(us)
        ctx.save_for_backward(query, key, bias, allowed, query_valid, blocks.cached_scores, *us, *vs, *frozen)
        u_all = torch.stack(us)
        n_k = key.shape[-2]
        v_all = torch.stack(vs) if vs else u_all.new_zeros(0, *blocks.batch_shape, 1, n_k)
        return u_all, v_all

    @staticmethod
    def backward(ctx, grad_us, grad_vs):
        query, key, bias, allowed, query_valid, scores, *rest = ctx.saved_tensors
        options: PotentialOptions = ctx.options
        us, rest = rest[: ctx.n_us], rest[ctx.n_us :]
        vs, frozen = rest[: len(rest) - ctx.n_frozen], rest[len(rest) - ctx.n_frozen :]
        blocks = ScoreBlocks(query, key, bias, allowed, query_valid, options.scale, options.block_size, scores)
        grads = {
            "query": torch.zeros_like(query) if ctx.needs_input_grad[0] else None,
            "key": torch.zeros_like(key) if ctx.needs_input_grad[1] else None,
            "bias": torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[2] else None,
        }
        if options.backward == "implicit" and vs:
            grad_block = implicit_grad_scores(blocks, us[-1], vs[-1], grad_us.sum(0), grad_vs.sum(0), options.solver)
        else:
            grad_block = _unrolled_grad_scores(blocks, list(us), list(vs), list(frozen), grad_us, grad_vs)
        for block in range(len(blocks.slices)):
            blocks.contract(block, grad_block(block), grads)
        return grads["query"], grads["key"], grads["bias"], None, None, None


def potentials(
    query: Tensor,
    key: Tensor,
    bias: Tensor | None,
    allowed: Tensor | None,
    query_valid: Tensor | None,
    options: PotentialOptions,
) -> tuple[Tensor, Tensor]:
    """Differentiable Sinkhorn iterates of S = scale·query keyᵀ + bias; see :class:`SinkhornPotentials`."""
    if options.backward not in BACKWARD_MODES:
        raise ValueError(f"sinkhorn backward must be one of {BACKWARD_MODES}, got {options.backward!r}")
    if options.steps < 1:
        raise ValueError(f"sinkhorn potentials need at least one half-step, got {options.steps}")
    return SinkhornPotentials.apply(query, key, bias, allowed, query_valid, options)
