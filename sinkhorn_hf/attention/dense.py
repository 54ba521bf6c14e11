"""Dense Sinkhorn attention as one autograd Function: the scores are computed once per call.

Two Functions compute the same thing, chosen from shapes and dtype alone (no host synchronisation):
:class:`KernelSinkhornAttention` (:mod:`.kernel`: E = exp(S - m 1ᵀ - 1 cᵀ) once, each half-step one matrix-vector
product with E, the output and the backward without forming A) while its scalings' range fits the dtype
(float32: K ≤ 3 at any length, up to K = 7 at N = 512), and :class:`DenseSinkhornAttention` beyond, where every
half-step is a logsumexp over the kept scores (:mod:`.scores`, one block holding every query). Both give the
log-domain reference's results (:mod:`.sinkhorn`) at any score range. Dropout and returning the weights happen
inside the Function; it saves only the inputs, the output and the iterates (O(K·N)): the backward rebuilds the
kernel or the scores once and differentiates through the half-steps (:mod:`.iterations`) or at convergence
(:mod:`.implicit`).
"""

from __future__ import annotations

import math
import threading

import torch
from torch import Tensor

from .implicit import implicit_terms
from .iterations import (
    block_half_steps,
    final_row_grads,
    final_row_potential,
    grad_block,
    half_steps,
    step_count,
    step_plans,
    unrolled_terms,
)
from .kernel import ShiftedKernel, kernel_domain_fits, matmul_into, rank_factors
from .scores import Plan, ScoreBlocks, marginal_support
from .settings import RouteOptions


class Workspace:
    """Scratch buffers reused from one call to the next: one flat buffer per (purpose, dtype, device, inference
    mode) and thread, grown to the largest request seen; a call gets a view of its first elements.

    On CPU every fresh N² buffer costs a page fault per 4 KiB page on first touch (glibc hands large blocks
    back to the system on free), which is a third of the dense route's time at N=512. One buffer per purpose
    (not per shape) keeps memory bounded when every batch has another shape (dynamic padding): what is held is
    at most the largest request of each purpose. Only buffers that never leave a forward or backward call come
    from here. CUDA has its own caching allocator and a compiled graph plans its own buffers, so there this is
    plain ``torch.empty``. ``clear()`` frees the cached buffers.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, purpose: str, like: Tensor) -> Tensor:
        """A buffer shaped like ``like``."""
        return self.empty(purpose, like.shape, like.dtype, like.device)

    def empty(self, purpose: str, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised contiguous tensor of ``shape``, valid until the next request for ``purpose``."""
        if torch.device(device).type != "cpu" or torch.compiler.is_compiling():  # compiled: inductor plans memory
            return torch.empty(shape, dtype=dtype, device=device)
        cache = self._local.__dict__.setdefault("buffers", {})
        # A buffer made under inference_mode is an inference tensor: autograd refuses it outside that mode.
        key = (purpose, dtype, torch.device(device), torch.is_inference_mode_enabled())
        size = math.prod(shape)
        buffer = cache.get(key)
        if buffer is None or buffer.numel() < size:
            cache.pop(key, None)  # freed before the larger one is made
            buffer = cache[key] = torch.empty(size, dtype=dtype, device=device)
        return buffer[:size].view(shape)

    def held_bytes(self) -> int:
        """Bytes this thread's cached buffers hold."""
        return sum(b.numel() * b.element_size() for b in self._local.__dict__.get("buffers", {}).values())

    def clear(self) -> None:
        self._local.__dict__.pop("buffers", None)


WORKSPACE = Workspace()


class StoredPlan(Plan):
    """A plan held whole (..., Lq, Lk): products with it are matrix-vector products (the implicit solve)."""

    def __init__(self, matrix: Tensor) -> None:
        self.matrix = matrix

    def times(self, weight: Tensor) -> Tensor:
        """(..., 1, Lk) -> (..., Lq, 1). (The transposed view picks matmul's fast matrix-vector path.)"""
        return torch.matmul(self.matrix, weight.transpose(-1, -2))

    def rtimes(self, weight: Tensor) -> Tensor:
        """(..., Lq, 1) -> (..., 1, Lk)."""
        return torch.matmul(weight.transpose(-1, -2), self.matrix)

    def gram(self, weight: Tensor, row_weight: Tensor) -> Tensor:
        return self.rtimes(row_weight * self.times(weight))

    def block(self, index: int, out: Tensor | None = None) -> Tensor:
        """The whole plan (one block: ``index`` is 0)."""
        return self.matrix if out is None else out.copy_(self.matrix)


def _support_and_shape(query, key, allowed, query_valid):
    """The Sinkhorn support and the scores' shape (..., Lq, Lk)."""
    n_q, n_k = query.shape[-2], key.shape[-2]
    support = marginal_support(allowed, query_valid, n_q, n_k, query.dtype, [slice(0, n_q)])
    return support, (*torch.broadcast_shapes(query.shape[:-2], key.shape[:-2]), n_q, n_k)


def _blocks(query, key, bias, allowed, query_valid, options: RouteOptions) -> ScoreBlocks:
    return ScoreBlocks(query, key, bias, allowed, query_valid, options.scale, None, workspace=WORKSPACE)


class DenseSinkhornAttention(torch.autograd.Function):
    """(query, key, value, bias, allowed, query_valid, options) -> output (..., Lq, Dv) [, weights (..., Lq, Lk)]:
    out = dropout(Sinkhorn_K(scale·QKᵀ + bias)) V, with the weights (after dropout) returned if asked."""

    @staticmethod
    def forward(ctx, query, key, value, bias, allowed, query_valid, options: RouteOptions):
        blocks = _blocks(query, key, bias, allowed, query_valid, options)
        iterations = options.settings.iterations
        us, vs, frozen = block_half_steps(blocks, step_count(iterations, query_valid), options.settings.tolerance)
        final = blocks.plan(final_row_potential(us, iterations, query_valid), vs[-1] if vs else 0.0, column=False)
        like = blocks.scratch(0)
        out = torch.empty_like(like) if options.return_weights else WORKSPACE.get("weights", like)
        weights = final.block(0, out)
        keep = None
        if options.dropout > 0:
            keep = torch.empty_like(weights, dtype=torch.bool).bernoulli_(1 - options.dropout)
            weights.masked_fill_(~keep, 0.0).mul_(1 / (1 - options.dropout))
        output = torch.matmul(weights, value)
        ctx.options = options
        ctx.counts = (len(us), len(vs))
        saved_weights = weights if options.return_weights else None
        ctx.save_for_backward(query, key, value, bias, allowed, query_valid, keep, saved_weights, *us, *vs, *frozen)
        if options.return_weights:
            return output, weights
        return output

    @staticmethod
    def backward(ctx, grad_output, grad_weights=None):
        query, key, value, bias, allowed, query_valid, keep, weights, *rest = ctx.saved_tensors
        options: RouteOptions = ctx.options
        iterations = options.settings.iterations
        n_us, n_vs = ctx.counts
        us, vs, frozen = rest[:n_us], rest[n_us : n_us + n_vs], rest[n_us + n_vs :]
        blocks = _blocks(query, key, bias, allowed, query_valid, options)
        final = blocks.plan(final_row_potential(us, iterations, query_valid), vs[-1] if vs else 0.0, column=False)
        plan_matrix = final.block(0, WORKSPACE.get("weights", blocks.scratch(0)))  # the forward's buffer is free now
        if weights is None:  # the (dropped-out) weights: the plan, masked and rescaled like the forward's
            weights = plan_matrix
            if keep is not None:
                weights = weights.masked_fill(~keep, 0.0).mul_(1 / (1 - options.dropout))
        out = WORKSPACE.get("grad", plan_matrix)
        grad_value, grad_scores, grad_u, grad_v = _plan_grads(grad_output, value, weights, grad_weights, out, bool(vs))
        del weights
        terms_out = plan_matrix  # free once the weights are applied, unless the implicit solve keeps the plan
        if options.settings.backward == "implicit" and vs:
            terms = implicit_terms(StoredPlan(plan_matrix), grad_u, grad_v, blocks.support, options.solver)
            terms_out = blocks.scratch(0)  # a StoredPlan's blocks never use the score blocks' scratch
        else:
            plans = step_plans(blocks.plan, list(us), list(vs), blocks.support.log_target)
            grad_us = final_row_grads(grad_u, n_us, iterations, query_valid)
            grad_vs = [None] * (n_vs - 1) + [grad_v] if vs else []
            terms = unrolled_terms(plans, list(frozen), grad_us, grad_vs, blocks.support)
        if terms:  # grad_block returns -Σ plan ⊙ left rightᵀ
            grad_scores.add_(grad_block(terms, 0, terms_out))

        return (*_input_grads(ctx, grad_scores, query, key, bias, options.scale, grad_value), None, None, None)


def _input_grads(ctx, grad_scores: Tensor, query, key, bias, scale: float, grad_value) -> tuple:
    """dQ, dK, dV, dbias from dS (..., Lq, Lk) (a workspace buffer: nothing returned may live in it)."""
    grad_query = grad_key = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_query = torch.matmul(grad_scores, key).mul_(scale)
    if ctx.needs_input_grad[1]:
        grad_key = torch.matmul(grad_scores.transpose(-1, -2), query).mul_(scale)
    if bias is not None and ctx.needs_input_grad[3]:
        grad_bias = grad_scores.sum_to_size(bias.shape)
        if grad_bias.data_ptr() == grad_scores.data_ptr():  # nothing summed: do not hand out the workspace
            grad_bias = grad_bias.clone()
    return grad_query, grad_key, grad_value if ctx.needs_input_grad[2] else None, grad_bias


def _plan_grads(grad_output, value, weights, grad_weights, out: Tensor, columns: bool):
    """dV = Aᵀ dO and d log A = A ⊙ dA (dA = dO Vᵀ plus the returned weights' own gradient) written into ``out``,
    with its row sums and, if ``columns``, its column sums. The dropped-out weights carry dropout's mask and
    rescaling."""
    grad_value = torch.matmul(weights.transpose(-1, -2), grad_output)
    grad_scores = matmul_into(grad_output, value.transpose(-1, -2), out)
    if grad_weights is not None:
        grad_scores.add_(grad_weights)
    grad_scores.mul_(weights)
    column_sums = grad_scores.sum(-2, keepdim=True) if columns else None
    return grad_value, grad_scores, grad_scores.sum(-1, keepdim=True), column_sums


def _dropped_out(weights: Tensor, keep: Tensor | None, dropout: float) -> Tensor:
    """The weights with dropout's mask and rescaling applied in place (``keep`` None: no dropout)."""
    return weights if keep is None else weights.masked_fill_(~keep, 0.0).mul_(1 / (1 - dropout))


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Σ_d a ⊙ b per row, (..., L, D) -> (..., L, 1)."""
    return torch.matmul(a.unsqueeze(-2), b.unsqueeze(-1)).squeeze(-1)


class KernelSinkhornAttention(torch.autograd.Function):
    """DenseSinkhornAttention in the kernel domain (:mod:`.kernel`): E = exp(S - m 1ᵀ - 1 cᵀ) once, each half-step
    a matrix-vector product with E, the output E-weighted without forming A (no dropout, weights not returned).
    Saves the inputs, the output, the shifts and the iterates (O(K·N)); the backward rebuilds E with one matrix
    product and one exponential, and writes dS = E ⊙ ((x ⊙ dO)(y ⊙ V)ᵀ - X Yᵀ) with one more product, X, Y of
    rank ≤ K + 1 from the reverse sweep (dS = A ⊙ dA - Σ plan ⊙ left rightᵀ, every plan E ⊙ x yᵀ)."""

    @staticmethod
    def forward(ctx, query, key, value, bias, allowed, query_valid, options: RouteOptions):
        support, shape = _support_and_shape(query, key, allowed, query_valid)
        # the masked copy for the column maxima lives in the backward's buffer, idle during a forward
        scratch = None if query_valid is None else WORKSPACE.empty("grad", shape, query.dtype, query.device)
        kernel_buffer = WORKSPACE.empty("scores", shape, query.dtype, query.device)
        kernel = ShiftedKernel(query, key, bias, allowed, support, options.scale, kernel_buffer, scratch)
        iterations = options.settings.iterations
        u = query.new_zeros(*shape[:-1], 1)  # never read: the first step is a row step
        steps = step_count(iterations, query_valid)
        tolerance = options.settings.tolerance
        us, vs, frozen = half_steps(steps, kernel.row_lse, kernel.column_lse, u, kernel.start(), support, tolerance)
        final = kernel.plan(final_row_potential(us, iterations, query_valid), vs[-1] if vs else 0.0, column=False)
        keep = weights = None
        if options.dropout == 0 and not options.return_weights:  # A V = x ⊙ (E (y ⊙ V)): A is never formed
            output = final.times_values(value)
        else:
            out = torch.empty(shape, dtype=query.dtype, device=query.device) if options.return_weights else None
            weights = final.block(0, WORKSPACE.get("weights", kernel.matrix) if out is None else out)
            if options.dropout > 0:
                keep = torch.empty_like(weights, dtype=torch.bool).bernoulli_(1 - options.dropout)
            output = torch.matmul(_dropped_out(weights, keep, options.dropout), value)
        ctx.options = options
        ctx.counts = (len(us), len(vs))
        saved_weights = weights if options.return_weights else None
        offsets = (kernel.row_offset, kernel.column_offset)
        ctx.save_for_backward(
            query, key, value, bias, allowed, query_valid, keep, saved_weights, output, *offsets, *us, *vs, *frozen
        )
        if options.return_weights:
            return output, weights
        return output

    @staticmethod
    def backward(ctx, grad_output, grad_weights=None):
        query, key, value, bias, allowed, query_valid, keep, weights, output, *rest = ctx.saved_tensors
        options: RouteOptions = ctx.options
        iterations = options.settings.iterations
        n_us, n_vs = ctx.counts
        offsets, rest = tuple(rest[:2]), rest[2:]
        us, vs, frozen = list(rest[:n_us]), list(rest[n_us : n_us + n_vs]), list(rest[n_us + n_vs :])
        support, shape = _support_and_shape(query, key, allowed, query_valid)
        kernel_buffer = WORKSPACE.empty("scores", shape, query.dtype, query.device)
        kernel = ShiftedKernel(query, key, bias, allowed, support, options.scale, kernel_buffer, None, offsets)
        final = kernel.plan(final_row_potential(us, iterations, query_valid), vs[-1] if vs else 0.0, column=False)
        factored = options.dropout == 0 and not options.return_weights
        grad_scores = WORKSPACE.empty("grad", shape, query.dtype, query.device)
        if factored:  # rowsum(A ⊙ dA) = dO·O, colsum(A ⊙ dA) = V·dV
            grad_value = final.rtimes_values(grad_output)
            grad_u = _rowdot(grad_output, output)
            grad_v = _rowdot(value, grad_value).transpose(-1, -2) if vs else None
        else:
            if weights is None:  # the (dropped-out) weights, as in the forward
                weights = _dropped_out(final.block(0, WORKSPACE.get("weights", grad_scores)), keep, options.dropout)
            plan_grads = _plan_grads(grad_output, value, weights, grad_weights, grad_scores, bool(vs))
            grad_value, _, grad_u, grad_v = plan_grads
            del weights
        if options.settings.backward == "implicit" and vs:
            terms = implicit_terms(final, grad_u, grad_v, support, options.solver)
        else:
            plans = step_plans(kernel.plan, us, vs, support.log_target)
            grad_us = final_row_grads(grad_u, n_us, iterations, query_valid)
            grad_vs = [None] * (n_vs - 1) + [grad_v] if vs else []
            terms = unrolled_terms(plans, frozen, grad_us, grad_vs, support)
        left, right = rank_factors(terms) if terms else (None, None)
        if factored:  # one product: [x ⊙ dO, -X] [y ⊙ V, Yᵀ]ᵀ, then ⊙ E
            lefts, rights = [final.x * grad_output], [final.y.transpose(-1, -2) * value]
            if terms:
                lefts.append(-left)
                rights.append(right.transpose(-1, -2))
            matmul_into(torch.cat(lefts, -1), torch.cat(rights, -1).transpose(-1, -2), grad_scores)
            grad_scores.mul_(kernel.matrix)
        elif terms:
            products = matmul_into(left, right, WORKSPACE.get("weights", grad_scores))  # the weights are applied
            grad_scores.addcmul_(kernel.matrix, products, value=-1)
        return (*_input_grads(ctx, grad_scores, query, key, bias, options.scale, grad_value), None, None, None)


def dense_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    bias: Tensor | None,
    allowed: Tensor | None,
    query_valid: Tensor | None,
    options: RouteOptions,
) -> tuple[Tensor, Tensor | None]:
    """Output (..., Lq, Dv) and, if ``options.return_weights``, the weights: in the kernel domain
    (KernelSinkhornAttention) where its scalings' range fits the dtype, else in the log domain
    (DenseSinkhornAttention)."""
    steps = step_count(options.settings.iterations, query_valid)
    fits = kernel_domain_fits(steps, query.shape[-2], key.shape[-2], query.dtype)
    function = KernelSinkhornAttention if fits else DenseSinkhornAttention
    result = function.apply(query, key, value, bias, allowed, query_valid, options)
    return result if options.return_weights else (result, None)
