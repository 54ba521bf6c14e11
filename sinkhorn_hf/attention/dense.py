"""Dense Sinkhorn attention as one autograd Function, in the kernel domain.

With m the row maximum of S and E = exp(S - m) (entries in [0, 1], zero outside the support), every plan the
algorithm touches is a rank-one rescaling E ⊙ x yᵀ: a row step is u = -(m + c + log(E e^{v-c})), a column step
v = log t - (d + log(zᵀE)) with z = e^{m+u-d}. After one exponential pass the K steps and their exact backward
are matrix-vector products with E, and the backward's dS = A ⊙ dA - E ⊙ (X Yᵀ) with X, Y of rank ≤ K + 1.

A kernel-domain sum is as accurate as the log-domain one while it stays above G = n·tiny/eps: the entries that
underflowed in E cannot matter then. A step (or plan) whose factors break that bound is computed in the log
domain from recomputed scores instead, so results agree with :mod:`.sinkhorn` to float precision either way.
Dropout and returning the weights happen inside the Function; it saves E, the iterates (O(K·N)) and the inputs.
"""

from __future__ import annotations

import functools
import threading

import torch
from torch import Tensor

from .implicit import implicit_terms
from .iterations import grad_block, half_steps, step_plans, unrolled_terms
from .scores import MASKED_LOGIT, BlockPlan, MarginalSupport, Plan, ScoreBlocks, marginal_support
from .settings import RouteOptions


class Workspace:
    """Scratch (..., Lq, Lk) buffers reused from one call to the next, one per (purpose, shape, dtype) and thread.

    On CPU every fresh N² buffer costs a page fault per 4 KiB page on first touch (glibc hands large blocks
    back to the system on free), which is a third of the dense route's time at N=512. Only buffers that never
    leave a forward or backward call come from here; the kernel E that is saved for backward does not. CUDA has
    its own caching allocator, so there this is plain ``torch.empty``. ``clear()`` frees the cached buffers.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, purpose: str, like: Tensor) -> Tensor:
        if like.device.type != "cpu":
            return torch.empty_like(like)
        cache = self._local.__dict__.setdefault("buffers", {})
        key = (purpose, like.shape, like.dtype)
        if key not in cache:
            cache[key] = torch.empty_like(like)
        return cache[key]

    def clear(self) -> None:
        self._local.__dict__.pop("buffers", None)


WORKSPACE = Workspace()


def _safe(x: Tensor, y: Tensor, n: int) -> bool:
    """Whether E ⊙ x yᵀ (x, y >= 0) loses nothing to the entries of E that underflowed: max x · max y ≤ 1/G."""
    info = torch.finfo(x.dtype)
    bound = info.eps / (n * info.tiny)
    return bool((x.amax(-2, keepdim=True) * y.amax(-1, keepdim=True) <= bound).all())


class KernelPlan(Plan):
    """The plan E ⊙ x yᵀ; x (..., Lq, 1), y (..., 1, Lk). ``log_form()`` is the same plan computed through exp
    on the scores (a BlockPlan), for where a product of factors would overflow."""

    def __init__(self, kernel: Tensor, x: Tensor, y: Tensor, log_form) -> None:
        self.kernel, self.x, self.y, self.log_form = kernel, x, y, log_form

    def times(self, weight: Tensor) -> Tensor:
        """(..., 1, Lk) -> (..., Lq, 1). (The transposed view picks matmul's fast matrix-vector path.)"""
        return self.x * torch.matmul(self.kernel, (self.y * weight).transpose(-1, -2))

    def rtimes(self, weight: Tensor) -> Tensor:
        """(..., Lq, 1) -> (..., 1, Lk)."""
        return self.y * torch.matmul((self.x * weight).transpose(-1, -2), self.kernel)

    def gram(self, weight: Tensor, row_weight: Tensor) -> Tensor:
        return self.rtimes(row_weight * self.times(weight))

    def block(self, index: int, out: Tensor | None = None) -> Tensor:
        """The whole plan (one block: ``index`` is 0)."""
        return torch.mul(self.kernel, self.x, out=out).mul_(self.y)


class _Problem:
    """Inputs of one call, with the log-domain scores built only if some step needs them."""

    def __init__(self, query, key, bias, allowed, query_valid, scale: float, support: MarginalSupport) -> None:
        self.query, self.key, self.bias, self.scale = query, key, bias, scale
        self.allowed, self.query_valid, self.support = allowed, query_valid, support
        self._blocks = None
        rows_mass, valid = support.row_has_mass, support.query_valid
        # rows that count in the column marginals: valid queries with mass (None: all)
        self.marginal_rows = valid if rows_mass is None else rows_mass if valid is None else rows_mass & valid

    @property
    def blocks(self) -> ScoreBlocks:
        if self._blocks is None:
            self._blocks = ScoreBlocks(
                self.query, self.key, self.bias, self.allowed, self.query_valid, self.scale, None
            )
        return self._blocks

    def kernel(self) -> tuple[Tensor, Tensor]:
        """E = exp(S - m) and the row maximum m (0 on rows without mass, so that E is 0 there)."""
        kernel = torch.matmul(self.query * self.scale, self.key.transpose(-1, -2))
        if self.bias is not None:
            kernel.add_(self.bias)
        if self.allowed is not None:
            kernel.masked_fill_(~self.allowed, MASKED_LOGIT)
        row_max = kernel.amax(-1, keepdim=True)
        if self.support.row_has_mass is not None:
            row_max = row_max.masked_fill(~self.support.row_has_mass, 0.0)
        return kernel.sub_(row_max).exp_(), row_max

    def plan(self, kernel: Tensor, row_max: Tensor, row_shift: Tensor, column_shift: Tensor | float, column: bool):
        """exp(S + row_shift + column_shift) on the row (or column-marginal) support: E ⊙ x yᵀ with the factors
        balanced so that one of them is at most 1, or a BlockPlan if the kernel domain would lose accuracy."""
        if not isinstance(column_shift, Tensor):
            column_shift = kernel.new_full((*kernel.shape[:-2], 1, kernel.shape[-1]), column_shift)
        alpha = row_max + row_shift
        if column:
            if self.marginal_rows is not None:
                alpha = alpha.masked_fill(~self.marginal_rows, float("-inf"))
            shift = alpha.amax(-2, keepdim=True)
            shift = torch.where(torch.isfinite(shift), shift, 0.0)
            x, y = (alpha - shift).exp(), (column_shift + shift).exp()
            if self.support.column_has_mass is not None:
                y = y.masked_fill(~self.support.column_has_mass, 0.0)
        else:
            shift = column_shift.amax(-1, keepdim=True)
            x, y = (alpha + shift).exp(), (column_shift - shift).exp()
            if self.support.row_has_mass is not None:
                x = x.masked_fill(~self.support.row_has_mass, 0.0)

        def log_form() -> BlockPlan:
            return self.blocks.plan(row_shift, column_shift, column)

        if _safe(x, y, max(kernel.shape[-2:])):
            return KernelPlan(kernel, x, y, log_form)
        return log_form()


def _half_steps(problem: _Problem, kernel: Tensor, row_max: Tensor, iterations: int, tolerance: float | None):
    """The K half-steps, each a product with E unless its sums fall below the accuracy bound (then the log-domain
    step on the scores)."""
    rows_mass, columns_mass = problem.support.row_has_mass, problem.support.column_has_mass
    n_q, n_k = kernel.shape[-2:]

    def row_lse(v: Tensor) -> Tensor:  # m + c + log Σ_k E e^{v - c}
        shift = v.amax(-1, keepdim=True)
        y = (v - shift).exp()
        sums = torch.matmul(kernel, y.transpose(-1, -2))
        x = sums.reciprocal()
        if rows_mass is not None:
            x = x.masked_fill(~rows_mass, 0.0)
        return row_max + shift + sums.log() if _safe(x, y, n_k) else problem.blocks.row_lse(v)

    def column_lse(u: Tensor) -> Tensor:  # d + log Σ_q e^{m + u - d} E, over the marginal rows
        alpha = row_max + u
        if problem.marginal_rows is not None:
            alpha = alpha.masked_fill(~problem.marginal_rows, float("-inf"))
        shift = alpha.amax(-2, keepdim=True)
        shift = torch.where(torch.isfinite(shift), shift, 0.0)
        z = (alpha - shift).exp()
        sums = torch.matmul(z.transpose(-1, -2), kernel)
        y = sums.reciprocal()
        if columns_mass is not None:
            y = y.masked_fill(~columns_mass, 0.0)
        return shift + sums.log() if _safe(z, y, n_q) else problem.blocks.column_lse(u)

    u = kernel.new_zeros(*kernel.shape[:-1], 1)
    v = kernel.new_zeros(*kernel.shape[:-2], 1, n_k)
    return half_steps(iterations, row_lse, column_lse, u, v, problem.support, tolerance)


def _subtract_terms(terms, kernel: Tensor, out: Tensor, scratch: Tensor) -> None:
    """out -= Σ plan ⊙ left rightᵀ: kernel terms as one rank-r product E ⊙ (X Yᵀ), the others through exp."""
    kernel_terms = [t for t in terms if isinstance(t[0], KernelPlan)]
    log_terms = [t for t in terms if not isinstance(t[0], KernelPlan)]
    if kernel_terms:
        xs = [plan.x if left is None else plan.x * left for plan, left, _ in kernel_terms]
        ys = [plan.y if right is None else plan.y * right for plan, _, right in kernel_terms]
        left, right = torch.cat(xs, -1), torch.cat(ys, -2)  # (..., Lq, r), (..., r, Lk)
        if bool(left.abs().amax() * right.abs().amax() * len(xs) < torch.finfo(kernel.dtype).max / 4):
            out.sub_(torch.matmul(left, right, out=scratch).mul_(kernel))
        else:  # the product would overflow where E is tiny: these terms go through exp instead
            log_terms += [(plan.log_form(), left_, right_) for plan, left_, right_ in kernel_terms]
    if log_terms:
        out.add_(grad_block(log_terms, 0, scratch))  # grad_block returns -Σ plan ⊙ left rightᵀ


def _factored(final: Plan, options: RouteOptions) -> bool:
    """Whether the output can use A = E ⊙ x yᵀ without forming A (no dropout mask, weights not returned)."""
    return isinstance(final, KernelPlan) and options.dropout == 0 and not options.return_weights


class DenseSinkhornAttention(torch.autograd.Function):
    """(query, key, value, bias, allowed, query_valid, options) -> output (..., Lq, Dv) [, weights (..., Lq, Lk)]:
    out = dropout(Sinkhorn_K(scale·QKᵀ + bias)) V, with the weights (after dropout) returned if asked."""

    @staticmethod
    def forward(ctx, query, key, value, bias, allowed, query_valid, options: RouteOptions):
        n_q, n_k = query.shape[-2], key.shape[-2]
        support = marginal_support(allowed, query_valid, n_q, n_k, query.dtype, n_q)
        problem = _Problem(query, key, bias, allowed, query_valid, options.scale, support)
        kernel, row_max = problem.kernel()
        us, vs, frozen = _half_steps(problem, kernel, row_max, options.settings.iterations, options.settings.tolerance)
        final = problem.plan(kernel, row_max, us[-1], vs[-1] if vs else 0.0, column=False)
        keep = weights = None
        if _factored(final, options):  # A V = x ⊙ (E (y ⊙ V)): the weights are never formed
            output = final.x * torch.matmul(kernel, final.y.transpose(-1, -2) * value)
        else:
            out = torch.empty_like(kernel) if options.return_weights else WORKSPACE.get("weights", kernel)
            weights = final.block(0, out)
            if options.dropout > 0:
                keep = torch.empty_like(weights, dtype=torch.bool).bernoulli_(1 - options.dropout)
                weights.masked_fill_(~keep, 0.0).mul_(1 / (1 - options.dropout))
            output = torch.matmul(weights, value)
        ctx.options = options
        ctx.counts = (len(us), len(vs))
        saved_weights = weights if options.return_weights else None
        ctx.save_for_backward(
            query, key, value, bias, allowed, query_valid, kernel, row_max, keep, saved_weights, *us, *vs, *frozen
        )
        if options.return_weights:
            return output, weights
        return output

    @staticmethod
    def backward(ctx, grad_output, grad_weights=None):
        query, key, value, bias, allowed, query_valid, kernel, row_max, keep, weights, *rest = ctx.saved_tensors
        options: RouteOptions = ctx.options
        n_us, n_vs = ctx.counts
        us, vs, frozen = rest[:n_us], rest[n_us : n_us + n_vs], rest[n_us + n_vs :]
        n_q, n_k = query.shape[-2], key.shape[-2]
        support = marginal_support(allowed, query_valid, n_q, n_k, query.dtype, n_q)
        problem = _Problem(query, key, bias, allowed, query_valid, options.scale, support)
        final = problem.plan(kernel, row_max, us[-1], vs[-1] if vs else 0.0, column=False)
        scratch = WORKSPACE.get("scratch", kernel)
        grad_scores = torch.matmul(grad_output, value.transpose(-1, -2), out=WORKSPACE.get("grad", kernel))
        # d log A = A ⊙ dA; the dropped-out weights carry the dropout mask and rescaling.
        if _factored(final, options):  # A = E ⊙ x yᵀ, never formed
            grad_value = None
            if ctx.needs_input_grad[2]:
                grad_value = final.y.transpose(-1, -2) * torch.matmul(kernel.transpose(-1, -2), final.x * grad_output)
            grad_scores.mul_(kernel).mul_(final.x).mul_(final.y)
        else:
            if weights is None:  # recompute the (dropped-out) weights: two passes over E
                weights = final.block(0, scratch)
                if keep is not None:
                    weights.masked_fill_(~keep, 0.0).mul_(1 / (1 - options.dropout))
            grad_value = torch.matmul(weights.transpose(-1, -2), grad_output) if ctx.needs_input_grad[2] else None
            if grad_weights is not None:
                grad_scores.add_(grad_weights)
            grad_scores.mul_(weights)
            del weights
        grad_u = grad_scores.sum(-1, keepdim=True)
        grad_v = grad_scores.sum(-2, keepdim=True) if vs else None
        if options.settings.backward == "implicit" and vs:
            terms = implicit_terms(final, grad_u, grad_v, support, options.solver)
        else:
            plans = step_plans(functools.partial(problem.plan, kernel, row_max), us, vs, support.log_target)
            grad_us = [None] * (n_us - 1) + [grad_u]
            grad_vs = [None] * (n_vs - 1) + [grad_v] if vs else []
            terms = unrolled_terms(plans, list(frozen), grad_us, grad_vs, support)
        _subtract_terms(terms, kernel, grad_scores, scratch)

        grad_query = grad_key = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_query = torch.matmul(grad_scores, key).mul_(options.scale)
        if ctx.needs_input_grad[1]:
            grad_key = torch.matmul(grad_scores.transpose(-1, -2), query).mul_(options.scale)
        if bias is not None and ctx.needs_input_grad[3]:
            grad_bias = grad_scores.sum_to_size(bias.shape)
            if grad_bias.data_ptr() == grad_scores.data_ptr():  # nothing summed: do not hand out the workspace
                grad_bias = grad_bias.clone()
        return grad_query, grad_key, grad_value, grad_bias, None, None, None


def dense_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    bias: Tensor | None,
    allowed: Tensor | None,
    query_valid: Tensor | None,
    options: RouteOptions,
) -> tuple[Tensor, Tensor | None]:
    """Output (..., Lq, Dv) and, if ``options.return_weights``, the weights; see DenseSinkhornAttention."""
    result = DenseSinkhornAttention.apply(query, key, value, bias, allowed, query_valid, options)
    return result if options.return_weights else (result, None)
