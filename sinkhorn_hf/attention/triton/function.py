"""The autograd Function around the Triton forward and backward passes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .backward import sinkhorn_backward
from .forward import sinkhorn_forward
from .problem import Problem


@dataclass(frozen=True)
class TritonOptions:
    """``iterations`` K (rows first), ``scale``, ``block_m`` queries and ``block_n`` keys per tile;
    ``query_valid_given``: the caller passed query validity (for even K, padded rows take one more row step)."""

    scale: float
    iterations: int
    block_m: int
    block_n: int
    query_valid_given: bool = False


class TritonSinkhornAttention(torch.autograd.Function):
    """(query, key, value, bias, allowed, query_valid, options) -> output (B, H, Lq, Dv) in value's dtype.

    query (B, H, Lq, D), key (B, H, Lk, D), value (B, H, Lk, Dv); bias broadcastable to (B, H, Lq, Lk) or None;
    allowed bool broadcastable to (B, H, Lq, Lk); query_valid bool broadcastable to (B, H, Lq).
    """

    @staticmethod
    def forward(ctx, query, key, value, bias, allowed, query_valid, options: TritonOptions):
        problem = Problem(
            query, key, value, bias, allowed, query_valid, options.scale, options.block_m, options.block_n
        )
        valid = problem.valid_rows() if options.query_valid_given else None
        state = sinkhorn_forward(problem, options.iterations, valid)
        ctx.save_for_backward(query, key, value, bias, allowed, query_valid)
        ctx.state, ctx.options = state, options
        batch, heads, n_q, _ = query.shape
        return state.output.reshape(batch, heads, n_q, -1).to(value.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, bias, allowed, query_valid = ctx.saved_tensors
        options: TritonOptions = ctx.options
        problem = Problem(
            query, key, value, bias, allowed, query_valid, options.scale, options.block_m, options.block_n
        )
        need_q, need_k, need_v, need_bias = ctx.needs_input_grad[:4]
        grads = sinkhorn_backward(
            problem,
            ctx.state,
            grad_output.reshape(problem.rows, problem.n_q, -1).to(value.dtype).contiguous(),
            need_value=need_v,
            need_scores=need_q or need_k,
            need_bias=need_bias,
        )
        grad_bias = None
        if need_bias:
            grad_bias = grads.scores.reshape(*query.shape[:2], problem.n_q, problem.n_k)
            grad_bias = grad_bias.sum_to_size(bias.shape).to(bias.dtype)
        return (
            _shaped(grads.query, query) if need_q else None,
            _shaped(grads.key, key) if need_k else None,
            _shaped(grads.value, value),
            grad_bias,
            None,
            None,
            None,
        )


def _shaped(grad: Tensor | None, like: Tensor) -> Tensor | None:
    return None if grad is None else grad.reshape(like.shape).to(like.dtype)
