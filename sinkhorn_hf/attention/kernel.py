"""The dense route's kernel domain: E = exp(S - m 1ᵀ - 1 cᵀ), shifted twice so that every half-step is a
matrix-vector product with E and every plan the algorithm touches is a rescaling E ⊙ x yᵀ.

Shifts: m_i = max_k S_ik (the row maximum), c_k = max_q (S_qk - m_q) ≤ 0 over the queries in the column marginals;
a query outside them (padding) gets m_q = max_k (S_qk - c_k) instead. Then every entry of E is ≤ 1, every row and
every column of the marginals holds an entry equal to 1, so with scalings normalised to a maximum of 1 no sum
can fall below the smallest scaling: a sum never underflows and the entries of E that did underflow are below
eps relative to it. Each half-step widens the range of the scalings by at most a factor N (the sum of N entries
≤ 1 with one entry equal to 1), so after h half-steps the range is at most N^h: :func:`kernel_domain_fits` says
when that stays within the dtype (float32: K ≤ 3 at any N up to 2^16, more at smaller N), and the dense route
takes the log domain beyond. The choice reads shapes and dtypes only: no host synchronisation.

Potentials stay natural and in the log domain, and the half-step loop is the reference's (:mod:`.iterations`),
run on log E: its potentials are relative to the shifts (u + m, v + c), small numbers, so no large shift is
added and subtracted again (which would cost eps·|S| in every weight). Starting from v = 0 is starting from c.
Treating the shifts as constants in the backward is exact: shifting S's columns by -c and the starting v by +c
leaves every plan unchanged, and a row shift is undone by the first row step. Logits are computed in base 2
(exp2 has no slow path on CPU for very negative inputs; see :mod:`.scores`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .scores import LN2, LOG2E, MASKED_LOGIT, MarginalSupport, Plan

# The dense route's largest length when lengths are symbolic (export, dynamic compile): N² scores per head
# beyond this would not fit any memory.
MAX_DENSE_LENGTH = 2**16


def kernel_domain_fits(steps: int, n_q, n_k, dtype: torch.dtype) -> bool:
    """Whether ``steps`` half-steps keep the scalings' range N^(steps + 1) within what ``dtype`` resolves:
    below eps·(largest float) / 1e6 for the backward's products and above N·tiny/eps for the sums' accuracy."""
    n = max(n_q, n_k) if isinstance(n_q, int) and isinstance(n_k, int) else MAX_DENSE_LENGTH
    info = torch.finfo(dtype)
    budget = math.log(info.eps / info.tiny) - math.log(max(n, 2)) - math.log(1e6)
    return (steps + 1) * math.log(max(n, 2)) <= budget


def matmul_into(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """a @ b written into ``out`` (a compiled graph refuses out= views and plans its own buffers)."""
    if torch.compiler.is_compiling():
        return out.copy_(torch.matmul(a, b))
    return torch.matmul(a, b, out=out)


def vector_times(vector: Tensor, matrix: Tensor) -> Tensor:
    """vector @ matrix, (..., 1, L) and (..., L, M) -> (..., 1, M).

    Under torch.compile on CPU a zero second row keeps it a matrix product: inductor lowers a one-row product to a
    multiply-and-sum and fuses it with whatever made ``matrix``, so every half-step would recompute exp over E
    (measured: the compiled dense route took 2.9× SDPA's forward, against 1.9× eager)."""
    if not (torch.compiler.is_compiling() and vector.device.type == "cpu"):
        return torch.matmul(vector, matrix)
    return torch.matmul(torch.cat([vector, torch.zeros_like(vector)], -2), matrix)[..., :1, :]


def row_sums(matrix: Tensor, weight: Tensor) -> Tensor:
    """matrix @ weightᵀ, (..., Lq, Lk) and (..., 1, Lk) -> (..., Lq, 1), as (weight @ matrixᵀ)ᵀ: a third faster
    than the column-vector product on CPU (measured: 44 vs 63 ms at 48×512×512, one thread)."""
    return vector_times(weight, matrix.transpose(-1, -2)).transpose(-1, -2)


def add_mask_(logits: Tensor, bias: Tensor | None, allowed: Tensor | None) -> None:
    """Add the bias and MASKED_LOGIT outside the support as one (broadcast) addition: on CPU an addition of a
    (B, 1, N, N) float costs a third of a masked_fill with that mask (measured, one thread)."""
    if allowed is None and bias is None:
        return
    additive = 0.0 if bias is None else bias * LOG2E
    if allowed is not None:
        additive = torch.where(allowed, additive, MASKED_LOGIT).to(logits.dtype)
    logits.add_(additive)


class ShiftedKernel:
    """E = exp(S - m 1ᵀ - 1 cᵀ) (..., Lq, Lk) on the support (0 outside), with its shifts as natural-log offsets
    ``row_offset`` = m (..., Lq, 1) and ``column_offset`` = c (..., 1, Lk).

    S = scale·Q Kᵀ + bias; ``allowed`` and ``support`` as in :class:`.scores.ScoreBlocks`. ``out`` receives E.
    Built from the scores (``offsets`` None: the forward, finding the shifts) or from known offsets (the backward:
    one matrix product with the offsets appended to Q and K, one exponential).
    """

    def __init__(
        self,
        query: Tensor,
        key: Tensor,
        bias: Tensor | None,
        allowed: Tensor | None,
        support: MarginalSupport,
        scale: float,
        out: Tensor,
        scratch: Tensor,
        offsets: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        self.support = support
        query = query * (scale * LOG2E)  # base-2 logits
        if offsets is None:
            logits = matmul_into(query, key.transpose(-1, -2), out)
            add_mask_(logits, bias, allowed)
            self.row_offset, self.column_offset = self._shift(logits, scratch)
        else:  # Q Kᵀ - m 1ᵀ - 1 cᵀ = [Q, -m, 1] [K, 1, c]ᵀ in base 2
            self.row_offset, self.column_offset = offsets
            rows, columns = self.row_offset * LOG2E, self.column_offset * LOG2E
            ones_q, ones_k = torch.ones_like(rows), torch.ones_like(columns)
            left = torch.cat([query, -rows.expand(*query.shape[:-1], 1), ones_q.expand(*query.shape[:-1], 1)], -1)
            key_rows = columns.transpose(-1, -2)
            right = torch.cat([key, ones_k.transpose(-1, -2).expand(*key.shape[:-1], 1), -key_rows], -1)
            logits = matmul_into(left, right.transpose(-1, -2), out)
            add_mask_(logits, bias, allowed)
        self.matrix = logits.exp2_()

    def _shift(self, logits: Tensor, scratch: Tensor) -> tuple[Tensor, Tensor]:
        """Subtract the two shifts from the base-2 ``logits`` in place; return them as natural offsets."""
        rows_mass, columns_mass, valid, _ = self.support
        row_max = logits.amax(-1, keepdim=True)
        if rows_mass is not None:  # a row without mass keeps MASKED_LOGIT: E is 0 there
            row_max = row_max.masked_fill(~rows_mass, 0.0)
        logits.sub_(row_max)
        if valid is None:
            marginal = logits
        else:  # padded queries out of the maxima: an addition (a where with a broadcast condition is 3× slower)
            outside = torch.where(valid, 0.0, MASKED_LOGIT).to(logits.dtype)
            if torch.compiler.is_compiling():
                marginal = logits + outside
            else:
                marginal = torch.add(logits, outside, out=scratch)
        column_max = marginal.amax(-2, keepdim=True)
        if columns_mass is not None:
            column_max = column_max.masked_fill(~columns_mass, 0.0)
        logits.sub_(column_max)
        if valid is not None:  # queries outside the marginals: their own maximum against the column shift
            extra = logits.amax(-1, keepdim=True).clamp_min(0.0).masked_fill(valid, 0.0)
            logits.sub_(extra)
            row_max = row_max + extra
        return row_max * LN2, column_max * LN2

    # --- the half-steps on log E: potentials relative to the shifts ---------------------------------------------

    def start(self) -> Tensor:
        """The column potential v = 0 relative to the shifts: c (..., 1, Lk)."""
        return self.column_offset

    def row_lse(self, v: Tensor) -> Tensor:
        """lse_k(log E + v) over allowed keys, (..., Lq, 1), for a relative column potential v."""
        peak = v.amax(-1, keepdim=True)
        sums = row_sums(self.matrix, (v - peak).exp())
        return peak + sums.clamp_min(torch.finfo(sums.dtype).tiny).log()

    def column_lse(self, u: Tensor) -> Tensor:
        """lse_q(log E + u) over the valid queries, (..., 1, Lk), for a relative row potential u."""
        if self.support.query_valid is not None:
            u = u.masked_fill(~self.support.query_valid, MASKED_LOGIT)
        peak = u.amax(-2, keepdim=True)
        sums = vector_times((u - peak).exp().transpose(-1, -2), self.matrix)
        return peak + sums.clamp_min(torch.finfo(sums.dtype).tiny).log()

    def plan(self, row_shift: Tensor, column_shift: Tensor | float, column: bool) -> KernelPlan:
        """exp(log E + row_shift + column_shift) as E ⊙ x yᵀ (see :func:`plan_scalings`)."""
        scalings = plan_scalings(self.column_offset, self.support.query_valid, row_shift, column_shift, column)
        return KernelPlan(self.matrix, *scalings)


def plan_scalings(
    column_offset: Tensor, query_valid: Tensor | None, row_shift: Tensor, column_shift: Tensor | float, column: bool
) -> tuple[Tensor, Tensor]:
    """x (..., Lq, 1) and y (..., 1, Lk), y at most 1, with exp(log E + row_shift + column_shift) = E ⊙ x yᵀ on the
    row (``column`` False) or column-marginal support (x is 0 on the queries outside ``query_valid``). Shifts are
    relative potentials; a number as ``column_shift`` is an absolute one (the start, v = 0)."""
    if not isinstance(column_shift, Tensor):
        column_shift = column_offset + column_shift
    peak = column_shift.amax(-1, keepdim=True)
    x = (row_shift + peak).exp()
    if column and query_valid is not None:
        x = x.masked_fill(~query_valid, 0.0)
    return x, (column_shift - peak).exp()


class KernelPlan(Plan):
    """The plan E ⊙ x yᵀ; x (..., Lq, 1), y (..., 1, Lk)."""

    def __init__(self, kernel: Tensor, x: Tensor, y: Tensor) -> None:
        self.kernel, self.x, self.y = kernel, x, y

    def times(self, weight: Tensor) -> Tensor:
        """(..., 1, Lk) -> (..., Lq, 1)."""
        return self.x * row_sums(self.kernel, self.y * weight)

    def rtimes(self, weight: Tensor) -> Tensor:
        """(..., Lq, 1) -> (..., 1, Lk)."""
        return self.y * vector_times((self.x * weight).transpose(-1, -2), self.kernel)

    def gram(self, weight: Tensor, row_weight: Tensor) -> Tensor:
        return self.rtimes(row_weight * self.times(weight))

    def block(self, index: int, out: Tensor | None = None) -> Tensor:
        """The plan (one block: ``index`` is 0), in ``out`` when given."""
        if out is None:
            return self.kernel * self.x * self.y
        return torch.mul(self.kernel, self.x, out=out).mul_(self.y)

    def times_values(self, value: Tensor) -> Tensor:
        """plan @ value, (..., Lk, Dv) -> (..., Lq, Dv), without forming the plan."""
        return self.x * torch.matmul(self.kernel, self.y.transpose(-1, -2) * value)

    def rtimes_values(self, grad: Tensor) -> Tensor:
        """planᵀ @ grad, (..., Lq, Dv) -> (..., Lk, Dv), without forming the plan."""
        return self.y.transpose(-1, -2) * torch.matmul(self.kernel.transpose(-1, -2), self.x * grad)


def rank_factors(terms) -> tuple[Tensor, Tensor]:
    """Σ plan ⊙ left rightᵀ over kernel-plan terms (None = ones) as E ⊙ (X Yᵀ): X (..., Lq, r), Y (..., r, Lk)."""
    xs = [plan.x if left is None else plan.x * left for plan, left, _ in terms]
    ys = [plan.y if right is None else plan.y * right for plan, _, right in terms]
    return torch.cat(xs, -1), torch.cat(ys, -2)
