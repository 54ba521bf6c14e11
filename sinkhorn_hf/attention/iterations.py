"""The Sinkhorn half-steps and their exact reverse sweep, shared by the reference and every attention route.

Forward: :func:`half_steps` is the one loop (rows first, tolerance freezing) behind
:func:`.sinkhorn.sinkhorn_potentials` (whole scores, recorded by autograd) and the routes (score blocks or the
kernel E, no graph). Backward: the plans of the steps are rebuilt from the saved iterates (O(K·N) numbers) and the
gradient w.r.t. the scores is returned as a few weighted plans.

A row step u = -lse_k(S + v) has Jacobian -P with P = exp(S + v + u) (rows sum to 1); a column step
v = log t - lse_q(S + u) has Jacobian -Q with Q = exp(S + u + v - log t) (valid columns sum to 1).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .scores import MarginalSupport, Plan, ScoreBlocks

# a plan from (row_shift, column_shift, column): see ScoreBlocks.logits for what the three mean
PlanMaker = Callable[[Tensor, Tensor | float, bool], Plan]


def half_steps(
    steps: int,
    row_lse: Callable[[Tensor], Tensor],
    column_lse: Callable[[Tensor], Tensor],
    u: Tensor,
    v: Tensor,
    support: MarginalSupport,
    tolerance: float | None,
):
    """The iterates of ``steps`` half-steps (rows first) from u = 0 (..., Lq, 1), v = 0 (..., 1, Lk).

    ``row_lse(v)``: lse_k(S + v) over allowed keys (..., Lq, 1); ``column_lse(u)``: lse_q(S + u) over the column
    support (..., 1, Lk). Returns u after each row step, v after each column step, and the converged mask
    (..., 1, 1) after each column step (empty without a tolerance): once a (batch, head) entry's column sums are
    within ``tolerance`` of their target it stops updating (checked on device, no host synchronisation).
    """
    us, vs, frozen = [], [], []
    converged = None
    for step in range(steps):
        if step % 2 == 0:
            new_u = -row_lse(v)
            if support.row_has_mass is not None:
                new_u = new_u.masked_fill(~support.row_has_mass, 0.0)
            u = new_u if converged is None else torch.where(converged, u, new_u)
            us.append(u)
        else:
            lse = column_lse(u)
            if tolerance is not None:  # the column sums of the current state are exp(lse + v)
                error = ((lse + v - support.log_target).exp() - 1).abs()
                if support.column_has_mass is not None:
                    error = error.masked_fill(~support.column_has_mass, 0.0)
                now = error.amax(dim=-1, keepdim=True) <= tolerance
                converged = now if converged is None else converged | now
                frozen.append(converged)
            new_v = support.log_target - lse
            if support.column_has_mass is not None:
                new_v = new_v.masked_fill(~support.column_has_mass, 0.0)
            v = new_v if converged is None else torch.where(converged, v, new_v)
            vs.append(v)
    return us, vs, frozen


def step_count(iterations: int, query_valid: Tensor | None) -> int:
    """Half-steps to run for K iterations: K, and for even K with query validity given one more row step, taken
    only by the rows outside the column marginals (see :func:`final_row_potential`)."""
    return iterations + (iterations % 2 == 0 and query_valid is not None)


def final_row_potential(us: list[Tensor], iterations: int, query_valid: Tensor | None) -> Tensor:
    """The row potential of the returned plan. For even K the last step fits the columns to the valid rows only;
    a padded row would keep exp(S + u + v) with v fitted to the others (it overflows for large scores), so the
    rows outside the column marginals take the extra row step and stay normalised."""
    if iterations % 2 or query_valid is None:
        return us[-1]
    return torch.where(query_valid, us[-2], us[-1])


def final_row_grads(grad_u: Tensor, count: int, iterations: int, query_valid: Tensor | None) -> list:
    """The gradient of each row iterate given that of :func:`final_row_potential` (None = zero)."""
    grads = [None] * count
    if iterations % 2 or query_valid is None:
        grads[-1] = grad_u
    else:
        grads[-2], grads[-1] = grad_u.masked_fill(~query_valid, 0.0), grad_u.masked_fill(query_valid, 0.0)
    return grads


def block_half_steps(blocks: ScoreBlocks, steps: int, tolerance: float | None):
    """half_steps in the log domain on score blocks."""
    q, k = blocks.query, blocks.key
    u = q.new_zeros(*blocks.batch_shape, q.shape[-2], 1)
    v = q.new_zeros(*blocks.batch_shape, 1, k.shape[-2])
    return half_steps(steps, blocks.row_lse, blocks.column_lse, u, v, blocks.support, tolerance)


def unrolled_terms(plans: list[Plan], frozen: list[Tensor], grad_us: list, grad_vs: list, support: MarginalSupport):
    """Exact reverse sweep through the half-steps, as terms (plan, left, right) with dS = -Σ plan ⊙ left rightᵀ
    (None = ones).

    ``plans[step]``: the plan of half-step ``step`` (row steps: P = exp(S + v_prev + u), columns:
    Q = exp(S + u_prev + v - log t)) with ``times`` (plan·w) and ``rtimes`` (planᵀ·w). ``frozen``: converged
    masks after each column step (empty without a tolerance). ``grad_us``/``grad_vs``: gradient of each iterate
    (None = zero).
    """
    u_bar = v_bar = 0
    terms = []
    for step in reversed(range(len(plans))):
        index = step // 2
        if step % 2 == 0:  # u = -lse_k(S + v_prev): du = -P dv_prev - P ⊙ dS (summed over keys)
            if grad_us[index] is not None:
                u_bar = u_bar + grad_us[index]
            if not isinstance(u_bar, Tensor):
                continue  # nothing flows back through this step
            weight = u_bar if support.row_has_mass is None else u_bar.masked_fill(~support.row_has_mass, 0.0)
            keep = frozen[index - 1] if frozen and index > 0 else None
            if keep is None:
                u_bar = 0
            else:  # a frozen entry kept the previous u: its gradient flows there unchanged
                weight = weight.masked_fill(keep, 0.0)
                u_bar = u_bar.masked_fill(~keep, 0.0)
            if index > 0:  # v_{-1} = 0 is a constant
                v_bar = v_bar - plans[step].rtimes(weight)
            terms.append((plans[step], weight, None))
        else:  # v = log t - lse_q(S + u_prev)
            if grad_vs[index] is not None:
                v_bar = v_bar + grad_vs[index]
            if not isinstance(v_bar, Tensor):
                continue
            mass = support.column_has_mass
            weight = v_bar if mass is None else v_bar.masked_fill(~mass, 0.0)
            keep = frozen[index] if frozen else None
            if keep is None:
                v_bar = 0
            else:
                weight = weight.masked_fill(keep, 0.0)
                v_bar = v_bar.masked_fill(~keep, 0.0)
            u_bar = u_bar - plans[step].times(weight)
            terms.append((plans[step], None, weight))
    return terms


def step_plans(plan: PlanMaker, us: list[Tensor], vs: list[Tensor], log_target: Tensor | float) -> list[Plan]:
    """The plan of every half-step, from the saved iterates: row step i P = exp(S + u_i + v_{i-1}) (v_{-1} = 0) on
    the row support, column step i Q = exp(S + u_i + v_i - log t) on the column-marginal support."""
    plans = []
    for step in range(len(us) + len(vs)):
        index = step // 2
        if step % 2 == 0:
            plans.append(plan(us[index], vs[index - 1] if index > 0 else 0.0, False))
        else:
            plans.append(plan(us[index], vs[index] - log_target, True))
    return plans


def grad_block(terms, index: int, out: Tensor, rows: slice = slice(None)) -> Tensor:
    """dS = -Σ plan ⊙ left rightᵀ on block ``index`` (query rows ``rows``) of the terms' plans, written into ``out``
    (..., rows, Lk)."""
    for position, (plan, left, right) in enumerate(terms):
        weight = left[..., rows, :] if right is None else right if left is None else left[..., rows, :] * right
        plan_block = plan.block(index)
        if position == 0:
            torch.mul(plan_block, weight, out=out).neg_()
        else:
            out.addcmul_(plan_block, weight, value=-1)
    return out
