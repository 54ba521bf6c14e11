"""Forward Triton kernels: the Sinkhorn half-steps as streaming passes, then a FlashAttention-style output pass.

A row step u = -lse_k(S + v) is one pass over key blocks per query block (online logsumexp), a column step
v = log(n_q/n_k) - lse_q(S + u) one pass over query blocks per key block; no N×N tile outlives a program. The
output pass is softmax_k(S + 1bᵀ) V with b the last column potential as a key bias, accumulated online: for odd K
its normaliser is the last row step (u_K = -lse), for even K (last step a column step) A = diag(e^{u + lse})
softmax_k(S + 1bᵀ), so the output is rescaled per query, except on padded query rows (query validity given), which
take one more row step (:func:`..iterations.final_row_potential`): its normaliser is that same lse, so they keep
softmax_k(S + 1bᵀ) V. Extra memory per head: O(N·Dv) + O(K·N).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..iterations import final_row_potential
from ..sinkhorn import MASKED_LOGIT
from .problem import Problem
from .tiles import (
    MASKED,
    dot,
    load_rows,
    load_vector,
    score_tile,
    shifted_logits,
    store_matrix,
    store_vector,
    support_tile,
)


@triton.jit
def reduce_pass_kernel(
    P, ST, N, ROW_SHIFT, COLUMN_SHIFT, WEIGHT, OUT,
    BLOCK_OWN: tl.constexpr, BLOCK_OTHER: tl.constexpr, BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr,
    COLUMN: tl.constexpr, LSE: tl.constexpr, OWN: tl.constexpr,
):  # fmt: skip
    """Per query (OWN=0, reducing over keys) or per key (OWN=1, over queries), on the (row or COLUMN) support:
    lse(S + a + c) if LSE, else Σ e^{S + a + c} w with w along the reduced axis. One kernel for both directions
    (the constexpr OWN picks the roles at compile time), so the two passes cannot drift apart."""
    AXIS: tl.constexpr = 1 - OWN  # the reduced axis of a (query, key) tile
    offs = tl.program_id(0) * BLOCK_OWN + tl.arange(0, BLOCK_OWN)
    offs_d = tl.arange(0, BLOCK_D)
    own = load_rows(P, ST, N, OWN, offs, offs_d)
    if OWN == 0:
        own_shift = load_vector(ROW_SHIFT, offs, N[1])
    else:
        own_shift = load_vector(COLUMN_SHIFT, offs, N[2])
    peak = tl.full((BLOCK_OWN,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_OWN,), tl.float32)
    for start in range(0, N[2 - OWN], BLOCK_OTHER):
        offs_other = start + tl.arange(0, BLOCK_OTHER)
        other = load_rows(P, ST, N, AXIS, offs_other, offs_d)
        if OWN == 0:
            s = score_tile(P, ST, N, own, other, offs, offs_other, HAS_BIAS)
            support = support_tile(P, ST, N, offs, offs_other, COLUMN)
            logits = shifted_logits(s, support, own_shift, load_vector(COLUMN_SHIFT, offs_other, N[2]))
        else:
            s = score_tile(P, ST, N, other, own, offs_other, offs, HAS_BIAS)
            support = support_tile(P, ST, N, offs_other, offs, COLUMN)
            logits = shifted_logits(s, support, load_vector(ROW_SHIFT, offs_other, N[1]), own_shift)
        if LSE:  # online logsumexp
            new_peak = tl.maximum(peak, tl.max(logits, AXIS))
            total = total * tl.exp(peak - new_peak) + tl.sum(tl.exp(logits - tl.expand_dims(new_peak, AXIS)), AXIS)
            peak = new_peak
        else:
            weight = tl.expand_dims(load_vector(WEIGHT, offs_other, N[2 - OWN]), OWN)
            total += tl.sum(tl.exp(logits) * weight, AXIS)
    if LSE:
        total = peak + tl.log(total)
    store_vector(OUT, offs, N[1 + OWN], total)


@triton.jit
def output_kernel(
    P, ST, N, COLUMN_SHIFT, OUT, LSE_OUT,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """softmax_k(S + 1bᵀ) V per query block (zero for rows without an allowed key) and its lse_k(S + b)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = load_rows(P, ST, N, 0, offs_m, offs_d)
    no_shift = tl.zeros((BLOCK_M,), tl.float32)
    peak = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    for start in range(0, N[2], BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        v = load_rows(P, ST, N, 2, offs_n, offs_dv)
        s = score_tile(P, ST, N, q, load_rows(P, ST, N, 1, offs_n, offs_d), offs_m, offs_n, HAS_BIAS)
        support = support_tile(P, ST, N, offs_m, offs_n, False)
        logits = shifted_logits(s, support, no_shift, load_vector(COLUMN_SHIFT, offs_n, N[2]))
        new_peak = tl.maximum(peak, tl.max(logits, 1))
        alpha = tl.exp(peak - new_peak)
        p = tl.exp(logits - new_peak[:, None])
        total = total * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v)
        peak = new_peak
    lse = peak + tl.log(total)
    out = tl.where((lse > MASKED / 2)[:, None], acc / total[:, None], 0.0)
    store_matrix(OUT, offs_m, N[1], offs_dv, N[4], out)
    store_vector(LSE_OUT, offs_m, N[1], lse)


class ForwardState(NamedTuple):
    """What the backward needs: the output (batch·H, Lq, Dv) float32, u after each row step (batch·H, Lq), v after
    each column step (batch·H, Lk), which rows/columns carry mass, and log(n_q/n_k) (batch·H, 1); the row
    potential ``u`` of the output's weights, the step count K and the query validity (batch·H, Lq) bool if given."""

    output: Tensor
    u: Tensor
    iterations: int
    query_valid: Tensor | None
    us: list[Tensor]
    vs: list[Tensor]
    row_has_mass: Tensor
    column_has_mass: Tensor | None
    log_target: Tensor | None


def _reduce(
    problem: Problem, row_shift: Tensor, column_shift: Tensor, weight: Tensor | None, column: bool, own: int
) -> Tensor:
    out = problem.row_vector() if own == 0 else problem.column_vector()
    blocks = problem.blocks()
    query_block, key_block = blocks["BLOCK_M"], blocks["BLOCK_N"]
    block_own, block_other = (query_block, key_block) if own == 0 else (key_block, query_block)
    tensors, strides, dims = problem.kernel_args()
    reduce_pass_kernel[problem.query_grid() if own == 0 else problem.key_grid()](
        tensors, strides, dims, row_shift, column_shift, out if weight is None else weight, out,
        BLOCK_OWN=block_own, BLOCK_OTHER=block_other, BLOCK_D=blocks["BLOCK_D"], HAS_BIAS=blocks["HAS_BIAS"],
        COLUMN=column, LSE=weight is None, OWN=own,
    )  # fmt: skip
    return out


def row_reduce(
    problem: Problem, row_shift: Tensor, column_shift: Tensor, weight: Tensor | None, column: bool
) -> Tensor:
    """Per query (batch·H, Lq): lse_k(S + a + c) if ``weight`` is None, else Σ_k e^{S + a + c} w_k."""
    return _reduce(problem, row_shift, column_shift, weight, column, own=0)


def column_reduce(
    problem: Problem, row_shift: Tensor, column_shift: Tensor, weight: Tensor | None, column: bool
) -> Tensor:
    """Per key (batch·H, Lk): lse_q(S + a + c) if ``weight`` is None, else Σ_q w_q e^{S + a + c}."""
    return _reduce(problem, row_shift, column_shift, weight, column, own=1)


def _has_mass(lse: Tensor) -> Tensor:
    return lse > MASKED_LOGIT / 2


def sinkhorn_forward(problem: Problem, iterations: int, query_valid: Tensor | None) -> ForwardState:
    """K half-steps (rows first) and the output A V with A = exp(S + u + v); ``query_valid`` (batch·H, Lq) bool
    or None (not given: no padded rows, so even K takes no extra row step)."""
    u, v = problem.row_vector(), problem.column_vector()
    us, vs = [], []
    column_has_mass = log_target = None
    # odd K: the last row step is the output pass's own normaliser
    for step in range(iterations - 1 if iterations % 2 else iterations):
        if step % 2 == 0:
            lse = row_reduce(problem, problem.row_vector(), v, None, column=False)
            u = torch.where(_has_mass(lse), -lse, 0.0)
            us.append(u)
        else:
            lse = column_reduce(problem, u, problem.column_vector(), None, column=True)
            if column_has_mass is None:
                column_has_mass = _has_mass(lse)
                n_k = column_has_mass.sum(-1, keepdim=True, dtype=torch.float32)
                log_target = (problem.query_count().clamp(min=1) / n_k.clamp(min=1)).log()
            v = torch.where(column_has_mass, log_target - lse, 0.0)
            vs.append(v)
    output = torch.empty(problem.rows, problem.n_q, problem.value.shape[-1], dtype=torch.float32,
                         device=problem.query.device)  # fmt: skip
    lse = problem.row_vector()
    tensors, strides, dims = problem.kernel_args()
    output_kernel[problem.query_grid()](tensors, strides, dims, v, output, lse, **problem.blocks())
    row_has_mass = _has_mass(lse)
    if iterations % 2 or query_valid is not None:  # the last (or padded rows' extra) row step
        us.append(torch.where(row_has_mass, -lse, 0.0))
    u = final_row_potential(us, iterations, query_valid)
    if iterations % 2 == 0:  # rows without mass are already zero, and there u + lse = MASKED_LOGIT
        output = output * (u + lse).exp().unsqueeze(-1)
    return ForwardState(output, u, iterations, query_valid, us, vs, row_has_mass, column_has_mass, log_target)
