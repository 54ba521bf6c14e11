"""Backward Triton kernels: the exact gradient of the K half-steps (the reverse sweep, "unrolled" mode).

With A = exp(S + u + b) the weights (u the last row potential, b the last column potential) and O = A V:
dV = Aᵀ dO; the direct gradient is dS = A ⊙ (dO Vᵀ), du = rowdot(dO, O), db = rowdot(V, dV). These flow back
through the half-steps: a row step u = -lse_k(S + v) gives dS -= P ⊙ ū1ᵀ and v̄ -= Pᵀ ū with P = e^{S + v + u};
a column step v = log t - lse_q(S + u) gives dS -= Q ⊙ 1v̄ᵀ and ū -= Q v̄ with Q = e^{S + u + v - log t}. The
sweep's plan-vector products are streaming passes (:func:`.forward.row_reduce`, :func:`.forward.column_reduce`);
dS is then assembled tile by tile from ≤ K rank-one terms (never stored, except as the bias gradient when the
bias needs one) and contracted into dQ and dK.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..iterations import final_row_grads
from .forward import ForwardState, column_reduce, row_reduce
from .problem import Problem
from .tiles import (
    MASKED,
    dot,
    load_matrix,
    load_rows,
    load_vector,
    score_tile,
    shifted_logits,
    store_matrix,
    support_tile,
)


@triton.jit
def _weights_tile(P, ST, N, q, k, offs_m, offs_n, U, B, HAS_BIAS: tl.constexpr):
    """S and A = e^{S + u + b} on the row support, for one tile."""
    s = score_tile(P, ST, N, q, k, offs_m, offs_n, HAS_BIAS)
    row_support = support_tile(P, ST, N, offs_m, offs_n, False)
    weights = tl.exp(shifted_logits(s, row_support, load_vector(U, offs_m, N[1]), load_vector(B, offs_n, N[2])))
    return s, row_support, weights


@triton.jit
def _grad_scores_tile(P, ST, N, q, k, v, grad_out, offs_m, offs_n, U, B, TERMS, n_terms, HAS_BIAS: tl.constexpr):
    """dS = A ⊙ (dO Vᵀ) - Σ_t plan_t ⊙ l_t r_tᵀ on one tile; TERMS = (row shifts, column shifts, lefts, rights,
    is-column flags) stacked over the terms t, plan_t = e^{S + a_t + c_t} on its row or column support."""
    s, row_support, weights = _weights_tile(P, ST, N, q, k, offs_m, offs_n, U, B, HAS_BIAS)
    column_support = support_tile(P, ST, N, offs_m, offs_n, True)
    grad = weights * dot(grad_out, tl.trans(v))
    # per term: plain loads, not load_vector/shifted_logits (nested jit calls are slow in the interpreter)
    in_m, in_n = offs_m < N[1], offs_n < N[2]
    rows_at = TERMS[0] + tl.program_id(1) * N[1] + offs_m
    columns_at = TERMS[1] + tl.program_id(1) * N[2] + offs_n
    lefts_at = TERMS[2] + tl.program_id(1) * N[1] + offs_m
    rights_at = TERMS[3] + tl.program_id(1) * N[2] + offs_n
    for t in range(n_terms):
        row_shift = tl.load(rows_at + t * tl.num_programs(1) * N[1], mask=in_m, other=0.0)
        left = tl.load(lefts_at + t * tl.num_programs(1) * N[1], mask=in_m, other=0.0)
        column_shift = tl.load(columns_at + t * tl.num_programs(1) * N[2], mask=in_n, other=0.0)
        right = tl.load(rights_at + t * tl.num_programs(1) * N[2], mask=in_n, other=0.0)
        support = tl.where(tl.load(TERMS[4] + t) != 0, column_support, row_support)
        logits = tl.where(support, s + row_shift[:, None] + column_shift[None, :], MASKED)
        grad -= tl.exp(logits) * left[:, None] * right[None, :]
    return grad


@triton.jit
def query_grad_kernel(
    P, ST, N, U, B, GRAD_OUT, TERMS, n_terms, GRAD_QUERY, GRAD_SCORES,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_BIAS: tl.constexpr, STORE_SCORES: tl.constexpr,
):  # fmt: skip
    """dQ = scale·dS K per query block; with STORE_SCORES also writes dS (batch·H, Lq, Lk) for the bias."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = load_rows(P, ST, N, 0, offs_m, offs_d)
    grad_out = load_matrix(GRAD_OUT, offs_m, N[1], offs_dv, N[4])
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, N[2], BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k = load_rows(P, ST, N, 1, offs_n, offs_d)
        v = load_rows(P, ST, N, 2, offs_n, offs_dv)
        grad = _grad_scores_tile(P, ST, N, q, k, v, grad_out, offs_m, offs_n, U, B, TERMS, n_terms, HAS_BIAS)
        acc += dot(grad.to(k.dtype), k)
        if STORE_SCORES:
            store_matrix(GRAD_SCORES, offs_m, N[1], offs_n, N[2], grad)
    store_matrix(GRAD_QUERY, offs_m, N[1], offs_d, N[3], acc * N[5])


@triton.jit
def key_grad_kernel(
    P, ST, N, U, B, GRAD_OUT, TERMS, n_terms, OUT,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_BIAS: tl.constexpr, VALUE: tl.constexpr, BLOCK_OUT: tl.constexpr,
):  # fmt: skip
    """Per key block: dV = Aᵀ dO if VALUE (TERMS unused), else dK = scale·dSᵀ Q. BLOCK_OUT: BLOCK_DV or BLOCK_D."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = load_rows(P, ST, N, 1, offs_n, offs_d)
    v = load_rows(P, ST, N, 2, offs_n, offs_dv)
    acc = tl.zeros((BLOCK_N, BLOCK_OUT), tl.float32)
    for start in range(0, N[1], BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        q = load_rows(P, ST, N, 0, offs_m, offs_d)
        grad_out = load_matrix(GRAD_OUT, offs_m, N[1], offs_dv, N[4])
        if VALUE:
            _, _, weights = _weights_tile(P, ST, N, q, k, offs_m, offs_n, U, B, HAS_BIAS)
            acc += dot(tl.trans(weights).to(grad_out.dtype), grad_out)
        else:
            grad = _grad_scores_tile(P, ST, N, q, k, v, grad_out, offs_m, offs_n, U, B, TERMS, n_terms, HAS_BIAS)
            acc += dot(tl.trans(grad).to(q.dtype), q)
    if VALUE:
        store_matrix(OUT, offs_n, N[2], tl.arange(0, BLOCK_OUT), N[4], acc)
    else:
        store_matrix(OUT, offs_n, N[2], tl.arange(0, BLOCK_OUT), N[3], acc * N[5])


class Terms(NamedTuple):
    """Rank-one plan terms of dS, stacked: row shifts, lefts (T, batch·H, Lq); column shifts, rights
    (T, batch·H, Lk); is_column (T,) int32 (column-marginal support instead of the row support)."""

    row_shift: Tensor
    column_shift: Tensor
    left: Tensor
    right: Tensor
    is_column: Tensor


def _minus(total: Tensor | None, part: Tensor) -> Tensor:
    return -part if total is None else total - part


def reverse_sweep(problem: Problem, state: ForwardState, grad_u: Tensor, grad_v: Tensor | None) -> Terms:
    """The exact reverse sweep through the half-steps from the gradients of the output's u and the last v."""
    us, vs = state.us, state.vs
    ones_q, ones_k, zeros_k = problem.row_vector(1.0), problem.column_vector(1.0), problem.column_vector()
    u_grads = final_row_grads(grad_u, len(us), state.iterations, state.query_valid)
    u_bar, v_bar = None, grad_v
    terms = []
    for step in reversed(range(len(us) + len(vs))):
        index = step // 2
        if step % 2 == 0:
            if u_grads[index] is not None:  # the output's u is this iterate (on some rows)
                u_bar = u_grads[index] if u_bar is None else u_bar + u_grads[index]
            weight = u_bar.masked_fill(~state.row_has_mass, 0.0)
            previous_v = vs[index - 1] if index > 0 else zeros_k
            terms.append((us[index], previous_v, weight, ones_k, False))
            if index > 0:  # v_{-1} = 0 is a constant
                v_bar = _minus(v_bar, column_reduce(problem, us[index], previous_v, weight, column=False))
            u_bar = None
        else:
            weight = v_bar.masked_fill(~state.column_has_mass, 0.0)
            shift = vs[index] - state.log_target
            terms.append((us[index], shift, ones_q, weight, True))
            u_bar = _minus(u_bar, row_reduce(problem, us[index], shift, weight, column=True))
            v_bar = None
    row_shift, column_shift, left, right, is_column = zip(*terms, strict=True)
    return Terms(
        torch.stack(row_shift),
        torch.stack(column_shift),
        torch.stack(left),
        torch.stack(right),
        torch.tensor(is_column, dtype=torch.int32, device=problem.query.device),
    )


class Gradients(NamedTuple):
    """dQ (batch·H, Lq, D), dK (batch·H, Lk, D), dV (batch·H, Lk, Dv) float32 or None; dS (batch·H, Lq, Lk) for
    the bias gradient, or None."""

    query: Tensor | None
    key: Tensor | None
    value: Tensor | None
    scores: Tensor | None


def sinkhorn_backward(
    problem: Problem, state: ForwardState, grad_output: Tensor, need_value: bool, need_scores: bool, need_bias: bool
) -> Gradients:
    """Gradients of O = A V; ``grad_output`` (batch·H, Lq, Dv) contiguous in the value dtype. ``need_scores``:
    dQ and dK are wanted; ``need_bias``: dS is wanted too."""
    tensors, strides, dims = problem.kernel_args()
    blocks = problem.blocks()
    u = state.u
    b = state.vs[-1] if state.vs else problem.column_vector()
    f32 = {"dtype": torch.float32, "device": grad_output.device}
    grad_value = torch.empty(problem.rows, problem.n_k, problem.value.shape[-1], **f32)
    key_grad_kernel[problem.key_grid()](
        tensors, strides, dims, u, b, grad_output, (u, b, u, b, u), 0, grad_value,
        VALUE=True, BLOCK_OUT=blocks["BLOCK_DV"], **blocks,
    )  # fmt: skip
    if not (need_scores or need_bias):
        return Gradients(None, None, grad_value if need_value else None, None)
    grad_u = (grad_output.float() * state.output).sum(-1)
    values = problem.value.reshape(problem.rows, problem.n_k, -1).float()
    grad_v = (values * grad_value).sum(-1) if state.vs else None
    terms = tuple(reverse_sweep(problem, state, grad_u, grad_v))
    n_terms = terms[0].shape[0]
    grad_query = torch.empty(problem.rows, problem.n_q, problem.query.shape[-1], **f32)
    grad_key = torch.empty(problem.rows, problem.n_k, problem.key.shape[-1], **f32)
    grad_scores = torch.empty(problem.rows, problem.n_q, problem.n_k, **f32) if need_bias else grad_query
    query_grad_kernel[problem.query_grid()](
        tensors, strides, dims, u, b, grad_output, terms, n_terms, grad_query, grad_scores,
        STORE_SCORES=need_bias, **blocks,
    )  # fmt: skip
    key_grad_kernel[problem.key_grid()](
        tensors, strides, dims, u, b, grad_output, terms, n_terms, grad_key,
        VALUE=False, BLOCK_OUT=blocks["BLOCK_D"], **blocks,
    )  # fmt: skip
    return Gradients(grad_query, grad_key, grad_value if need_value else None, grad_scores if need_bias else None)
