"""Dense Sinkhorn attention as one autograd Function: the scores are computed once and kept for the call.

Every half-step is a logsumexp over the kept scores (:mod:`.scores`, one block holding every query), so results
are those of the log-domain reference (:mod:`.sinkhorn`) at any score range, with no data-dependent choice and
no host synchronisation. Dropout and returning the weights happen inside the Function; it saves only the inputs
and the iterates (O(K·N)): the backward recomputes the scores once and differentiates through the half-steps
(:mod:`.iterations`) or at convergence (:mod:`.implicit`, the converged plan held whole for its solve).
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
    step_count,
    step_plans,
    unrolled_terms,
)
from .scores import Plan, ScoreBlocks
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
        grad_value = torch.matmul(weights.transpose(-1, -2), grad_output) if ctx.needs_input_grad[2] else None
        # d log A = A ⊙ dA; the dropped-out weights carry the dropout mask and rescaling.
        grad_scores = torch.matmul(grad_output, value.transpose(-1, -2), out=WORKSPACE.get("grad", plan_matrix))
        if grad_weights is not None:
            grad_scores.add_(grad_weights)
        grad_scores.mul_(weights)
        del weights
        grad_u = grad_scores.sum(-1, keepdim=True)
        grad_v = grad_scores.sum(-2, keepdim=True) if vs else None
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
