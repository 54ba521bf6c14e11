"""Streaming Sinkhorn attention: no N×N matrix is ever held, and the last pass is PyTorch's fused SDPA.

The half-steps run on blocks of query rows (:mod:`.scores`, online logsumexp across blocks), always ending on a
row step. When K is odd that step is the last one of the algorithm, and A = softmax_k(S + 1bᵀ) with b the last
column potential: one ``scaled_dot_product_attention`` call with b as an additive key bias gives the output, and
its fused backward gives dQ, dK, dV. For even K the last step is a column step: A = diag(exp(u_{K-1} - u'))
softmax_k(S + 1bᵀ) with u' = -lse_k(S + b) one extra row step, so SDPA's output is rescaled per query.

b is passed to SDPA without gradient; its gradient, the column sums of SDPA's dS, is
Σ_q P_qk dO_q·(V_k - O_q) = V_k·dV_k - (Pᵀ D)_k with D_q = dO_q·O_q and P = exp(S + b + u'), one more pass over
the blocks. (Rows outside the column marginals keep the extra row step for even K: they stay normalised.) It
then flows back through the half-steps, whose contributions to dQ and dK are added in place to
SDPA's. Extra memory beyond SDPA's own: two score blocks and O(K·N) iterates.

A support or bias that differs between queries (transformers' (B, 1, N, N) padding mask) would make SDPA's mask,
combined with b, an N×N float tensor per head. Then the final pass runs one SDPA call per block of query rows,
each with its slice of the mask, and the backward recomputes each block's call (without dropout: with it, the
fused call keeps its graph as above, since the dropout mask could not be replayed).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .implicit import implicit_terms
from .iterations import block_half_steps, grad_block, step_plans, unrolled_terms
from .kernel_streaming import KernelStreamingAttention, kernel_streaming_supports
from .scores import MASKED_LOGIT, ScoreBlocks, query_rows
from .settings import RouteOptions


def sdpa_mask(allowed: Tensor | None, bias: Tensor | None, key_bias: Tensor | None = None) -> Tensor | None:
    """The ``attn_mask`` for SDPA: the support, an additive bias and a per-key bias (..., 1, Lk).

    A support that is the same for every query (padding masks) and no bias stay (..., 1, Lk): SDPA's fused
    kernels broadcast it without an N×N mask. Masked entries get MASKED_LOGIT (finite: a query with no allowed
    key gets a finite, uniform row, which the caller zeroes).
    """
    if bias is None and key_bias is None:
        return allowed
    if allowed is not None and bias is None and key_bias is not None:
        allowed = _same_for_every_query(allowed)
    mask = 0.0 if bias is None else bias
    if key_bias is not None:
        mask = mask + key_bias
    return mask if allowed is None else torch.where(allowed, mask, MASKED_LOGIT)


def _same_for_every_query(allowed: Tensor) -> Tensor:
    """allowed (..., 1, Lk) when its layout says it is one row for every query (a broadcast or expanded padding
    mask); known from shape and strides alone, so no host synchronisation."""
    if allowed.shape[-2] > 1 and allowed.stride(-2) == 0:
        return allowed[..., :1, :]
    return allowed


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Σ_d a ⊙ b per row, (..., L, D) -> (..., L, 1), without an (..., L, D) temporary."""
    return torch.matmul(a.unsqueeze(-2), b.unsqueeze(-1)).squeeze(-1)


def _log_rescale(us: list[Tensor], query_valid: Tensor | None) -> Tensor:
    """log r = u_{K-1} - u' for even K; 0 on rows outside the column marginals, which keep the extra row step."""
    log_rescale = us[-2] - us[-1]
    return log_rescale if query_valid is None else log_rescale.masked_fill(~query_valid, 0.0)


def _weights_row_potential(us: list[Tensor], iterations: int, query_valid: Tensor | None) -> Tensor:
    """The row potential of the Sinkhorn weights (the extra row step of even K is SDPA's, not theirs)."""
    if iterations % 2:
        return us[-1]
    return us[-2] if query_valid is None else torch.where(query_valid, us[-2], us[-1])


def _zero_rows_without_mass(output: Tensor, allowed: Tensor | None) -> Tensor:
    return output if allowed is None else output.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)


def _per_query(allowed: Tensor | None, bias: Tensor | None) -> bool:
    """Whether SDPA's mask for the final pass would vary over queries (an N×N tensor once b is added)."""
    if bias is not None and bias.shape[-2] > 1:
        return True
    return allowed is not None and _same_for_every_query(allowed).shape[-2] > 1


def _block_sdpa(query_rows: Tensor, key, value, allowed_rows, bias_rows, key_bias, scale: float) -> Tensor:
    """softmax_k(S + 1bᵀ) V for one block of query rows, given the block's rows of the query, support and bias."""
    return torch.nn.functional.scaled_dot_product_attention(
        query_rows, key, value, attn_mask=sdpa_mask(allowed_rows, bias_rows, key_bias), scale=scale
    )


def _blockwise_sdpa(blocks: ScoreBlocks, query, key, value, bias, allowed, key_bias, scale) -> Tensor:
    """softmax_k(S + 1bᵀ) V, one SDPA call per block of query rows, each with its slice of the mask."""
    parts = [
        _block_sdpa(query[..., rows, :], key, value, query_rows(allowed, rows), query_rows(bias, rows), key_bias, scale)
        for rows in blocks.slices
    ]
    return torch.cat(parts, dim=-2)


def _blockwise_sdpa_grads(blocks, leaves, allowed, key_bias, scale, grad_output) -> list[Tensor | None]:
    """The gradients of :func:`_blockwise_sdpa` w.r.t. the leaves (query, key, value, bias) that require them,
    recomputing one block at a time."""
    query, key, value, bias = leaves
    grads = [None if leaf is None or not leaf.requires_grad else torch.zeros_like(leaf) for leaf in leaves]
    for rows in blocks.slices:
        block_bias = None if bias is None else query_rows(bias, rows).detach().requires_grad_(bias.requires_grad)
        block_leaves = [query[..., rows, :].detach().requires_grad_(query.requires_grad), key, value, block_bias]
        with torch.enable_grad():
            inner = _block_sdpa(*block_leaves[:3], query_rows(allowed, rows), block_bias, key_bias, scale)
        wanted = [(i, leaf) for i, leaf in enumerate(block_leaves) if leaf is not None and leaf.requires_grad]
        parts = torch.autograd.grad(inner, [leaf for _, leaf in wanted], grad_output[..., rows, :])
        for (i, _), part in zip(wanted, parts, strict=True):
            if i == 0:
                grads[0][..., rows, :] += part
            elif i == 3 and bias.shape[-2] > 1:
                grads[3][..., rows, :] += part
            else:
                grads[i] += part
    return grads


class StreamingSinkhornAttention(torch.autograd.Function):
    """(query, key, value, bias, allowed, query_valid, options) -> output (..., Lq, Dv)."""

    @staticmethod
    def forward(ctx, query, key, value, bias, allowed, query_valid, options: RouteOptions):
        blocks = ScoreBlocks(query, key, bias, allowed, query_valid, options.scale, options.block_size)
        iterations = options.settings.iterations
        steps = iterations + (iterations + 1) % 2  # always end on a row step
        us, vs, frozen = block_half_steps(blocks, steps, options.settings.tolerance)
        needs = list(ctx.needs_input_grad[:4])
        needs[2] = needs[2] or needs[0] or needs[1] or needs[3]  # dV is also needed for the key bias gradient
        ctx.needs = needs
        if options.dropout == 0 and _per_query(allowed, bias):  # never an N×N mask: recomputed per block
            inner = _blockwise_sdpa(blocks, query, key, value, bias, allowed, vs[-1], options.scale)
            ctx.inner = (None, inner)
        else:  # SDPA on detached leaves: its graph lives as long as ours (so backward can run more than once)
            with torch.enable_grad():
                leaves = [
                    None if x is None else x.detach().requires_grad_(need)
                    for x, need in zip((query, key, value, bias), needs, strict=True)
                ]
                inner = torch.nn.functional.scaled_dot_product_attention(
                    *leaves[:3],
                    attn_mask=sdpa_mask(allowed, leaves[3], vs[-1]),
                    dropout_p=options.dropout,
                    scale=options.scale,
                )
            ctx.inner = (leaves, inner)
        ctx.options = options
        ctx.counts = (len(us), len(vs))
        ctx.save_for_backward(query, key, value, bias, allowed, query_valid, *us, *vs, *frozen)
        output = inner.detach()
        if iterations % 2 == 0:
            output = output * _log_rescale(us, query_valid).exp()
        return _zero_rows_without_mass(output, allowed)

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, bias, allowed, query_valid, *rest = ctx.saved_tensors
        leaves, inner = ctx.inner
        options: RouteOptions = ctx.options
        iterations = options.settings.iterations
        n_us, n_vs = ctx.counts
        us, vs, frozen = list(rest[:n_us]), list(rest[n_us : n_us + n_vs]), list(rest[n_us + n_vs :])
        blocks = ScoreBlocks(query, key, bias, allowed, query_valid, options.scale, options.block_size)
        grad_output = _zero_rows_without_mass(grad_output, allowed)
        grad_us = [None] * n_us
        if iterations % 2 == 0:  # output = r ⊙ inner with log r = u_{K-1} - u'
            rescale = _log_rescale(us, query_valid).exp()
            grad_log_rescale = _rowdot(grad_output, inner.detach()) * rescale
            if query_valid is not None:
                grad_log_rescale = grad_log_rescale.masked_fill(~query_valid, 0.0)
            grad_us[-2], grad_us[-1] = grad_log_rescale, -grad_log_rescale
            grad_output = grad_output * rescale
        if leaves is None:  # the blockwise final pass, recomputed
            leaves = [
                None if x is None else x.detach().requires_grad_(need)
                for x, need in zip((query, key, value, bias), ctx.needs, strict=True)
            ]
            grad_query, grad_key, grad_value, grad_bias = _blockwise_sdpa_grads(
                blocks, leaves, allowed, vs[-1], options.scale, grad_output
            )
        else:
            wanted = [leaf for leaf in leaves if leaf is not None and leaf.requires_grad]
            grads = dict(
                zip(map(id, wanted), torch.autograd.grad(inner, wanted, grad_output, retain_graph=True), strict=True)
            )
            grad_query, grad_key, grad_value, grad_bias = (
                None if leaf is None else grads.get(id(leaf)) for leaf in leaves
            )
        if not ctx.needs_input_grad[2]:
            grad_value, value_grad_for_bias = None, grad_value
        else:
            value_grad_for_bias = grad_value
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1] or ctx.needs_input_grad[3]):
            return None, None, grad_value, None, None, None, None
        # SDPA's own dS is G - P ⊙ D 1ᵀ with G = A ⊙ dA (A the Sinkhorn weights), P = softmax(S + b) and
        # D = rowsum(G) = dO·O; colsum(G) = V_k·dV_k. The key bias b gets colsum(G) - Pᵀ D.
        softmax = blocks.plan(us[-1], vs[-1], column=False)
        row_sums = _rowdot(grad_output, inner.detach())
        column_sums = _rowdot(value, value_grad_for_bias).transpose(-1, -2)
        if options.settings.backward == "implicit":  # linearise at A = exp(S + u + v), as the dense route does
            weights = blocks.plan(_weights_row_potential(us, iterations, query_valid), vs[-1], column=False)
            terms = implicit_terms(weights, row_sums, column_sums, blocks.support, options.solver)
            terms.append((softmax, -row_sums, None))  # SDPA already applied -P ⊙ D 1ᵀ
        else:
            grad_vs = [None] * (n_vs - 1) + [column_sums - softmax.rtimes(row_sums)]
            plans = step_plans(blocks.plan, us, vs, blocks.log_target)
            terms = unrolled_terms(plans, frozen, grad_us, grad_vs, blocks.support)
        targets = {"query": grad_query, "key": grad_key, "bias": grad_bias}
        if grad_bias is None and bias is not None and ctx.needs_input_grad[3]:
            targets["bias"] = torch.zeros_like(bias)
        if terms:
            accumulator = torch.empty_like(blocks.scratch(0))
            for index, rows in enumerate(blocks.slices):
                out = accumulator[..., : rows.stop - rows.start, :]
                blocks.contract(index, grad_block(terms, index, out, rows), targets)
        return targets["query"], targets["key"], grad_value, targets["bias"], None, None, None


def streaming_attention(query, key, value, bias, allowed, query_valid, options: RouteOptions) -> Tensor:
    """The streaming route: in the kernel domain (:mod:`.kernel_streaming`) where it covers the call, else the
    log-domain blocks with a fused SDPA final pass (:class:`StreamingSinkhornAttention`)."""
    if kernel_streaming_supports(query, key, query_valid, options):
        return KernelStreamingAttention.apply(query, key, value, bias, allowed, query_valid, options)
    return StreamingSinkhornAttention.apply(query, key, value, bias, allowed, query_valid, options)
