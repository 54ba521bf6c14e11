"""Streaming Sinkhorn attention in the kernel domain: the dense route's E = exp(S - m 1ᵀ - 1 cᵀ) (:mod:`.kernel`),
recomputed one block of query rows at a time and never held whole.

The first pass finds the shifts (row maxima m, then the running column maxima c of S - m) and takes the first
row step and the first column step's sums with them (:meth:`BlockKernel._first_steps`). Every later pass rebuilds
a block of E with one matrix product (the shifts appended to the query block and to K) and one exponential, and
does all it can with it: a row step and, as soon as the block's new row potentials are known, its share of the
next column step (an online sum across blocks, rescaled to a running peak), or the last row step and the output
x ⊙ E (y ⊙ V). So K half-steps cost ⌈K/2⌉ passes (one more for even K, the output), against K passes of max,
subtract, exp and sum in the log domain. The backward is the dense kernel route's, block by block: dV, the
reverse sweep's products with E, then dS = E ⊙ ((x ⊙ dO)(y ⊙ V)ᵀ - X Yᵀ) per block, contracted into dQ, dK.

Padded queries (outside the column marginals) are left out of the column maxima and get their own row shift against
c, found in the first pass that rebuilds their block (a block holds whole rows), so they cost no pass of their own.

Taken for the calls the kernel domain covers (:func:`kernel_streaming_supports`): no dropout, no tolerance, odd K
when some queries are padded (for even K they take one more row step, which only the log-domain route does), and
the scalings' range within the dtype. Extra memory: one block of E and one of dS, K with two columns appended, and
O(K·N) vectors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .implicit import implicit_terms
from .iterations import step_plans, unrolled_terms
from .kernel import (
    add_mask_,
    kernel_domain_fits,
    matmul_into,
    plan_scalings,
    rank_factors,
    row_sums,
    vector_times,
)
from .scores import LN2, LOG2E, MASKED_LOGIT, Plan, add_product_, contract, marginal_support, query_blocks, query_rows
from .settings import RouteOptions


def kernel_streaming_supports(query: Tensor, key: Tensor, query_valid: Tensor | None, options: RouteOptions) -> bool:
    """Whether the kernel-domain streaming route computes this call (from shapes, dtype and settings only)."""
    settings = options.settings
    return (
        options.dropout == 0
        and settings.tolerance is None
        and (query_valid is None or settings.iterations % 2 == 1)
        and kernel_domain_fits(settings.iterations, query.shape[-2], key.shape[-2], query.dtype)
    )


class BlockKernel:
    """E = exp(S - m 1ᵀ - 1 cᵀ) (..., Lq, Lk) in blocks of query rows; S = scale·Q Kᵀ + bias on ``allowed``.

    ``query_valid`` (..., Lq, 1) bool or None: the queries in the column marginals. ``offsets`` (m (..., Lq, 1),
    c (..., 1, Lk), natural): the shifts when known (the backward); None: the forward's first pass finds them
    (:meth:`forward_steps`), the padded queries' own row shifts being settled by the next rebuild of each block
    (:meth:`block`).
    """

    def __init__(self, query, key, bias, allowed, query_valid, scale: float, block_size: int, offsets=None) -> None:
        self.query, self.key, self.bias, self.allowed, self.scale = query, key, bias, allowed, scale
        n_q, n_k = query.shape[-2], key.shape[-2]
        self.slices = query_blocks(n_q, block_size)
        self.support = marginal_support(allowed, query_valid, n_q, n_k, query.dtype, self.slices)
        padded = offsets is None and query_valid is not None
        self._unsettled = set(range(len(self.slices))) if padded else set()  # blocks whose padded rows wait
        batch_shape = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2])
        rows = self.slices[0].stop
        self._scratch = torch.empty((*batch_shape, rows, n_k), dtype=query.dtype, device=query.device)
        self.row_offset = self.column_offset = None
        if offsets is not None:
            self._set_offsets(*offsets)

    def _set_offsets(self, row_offset: Tensor, column_offset: Tensor) -> None:
        self.row_offset, self.column_offset = row_offset, column_offset
        # scale·Q Kᵀ - m 1ᵀ - 1 cᵀ = [Q, -m, 1] [scale·K, 1, -c]ᵀ in base 2: a block's left factor is one cat
        ones = torch.ones_like(column_offset).transpose(-1, -2)
        columns = column_offset.transpose(-1, -2) * -LOG2E
        self._right = torch.cat([self.key * (self.scale * LOG2E), ones, columns], -1).transpose(-1, -2)
        self._row_terms = torch.cat([row_offset * -LOG2E, torch.ones_like(row_offset)], -1)

    def scratch(self, index: int) -> Tensor:
        rows = self.slices[index]
        return self._scratch[..., : rows.stop - rows.start, :]

    def _logits(self, index: int) -> Tensor:
        """Base-2 logits S·log2 e of block ``index``, masked, in the scratch buffer."""
        rows = self.slices[index]
        out = matmul_into(
            self.query[..., rows, :] * (self.scale * LOG2E), self.key.transpose(-1, -2), self.scratch(index)
        )
        add_mask_(out, query_rows(self.bias, rows), query_rows(self.allowed, rows))
        return out

    def _first_steps(self, column: bool) -> tuple[Tensor, Tensor | None]:
        """The shifts, and in the same pass the first row step from v = 0 and (``column``) the first column step:
        u₀ (..., Lq, 1) and v₁ (..., 1, Lk) relative to the shifts, which it sets (m the row maxima of S, c the
        column maxima of S - m over the valid queries).

        The column maxima are running ones: block b is exponentiated against c over blocks ≤ b (entries ≤ 1, a 1 in
        every column seen), its row sums weighted by 2^c give Σ_k exp(S - m) (a dropped term is below 2^c, against
        the row's 1), and the column sums gathered so far are rescaled as c grows. A column whose entries so far
        are all masked shifts by 0 meanwhile (its entries are then exactly 0). Padded queries are masked out of E
        here (they take their own row shift when their block is first rebuilt; see :meth:`block`), so their u₀ is
        0: a value no later step reads with a nonzero weight, since the column plans zero their rows.
        """
        rows_mass, columns_mass, valid, log_target = self.support
        tiny = torch.finfo(self.query.dtype).tiny
        row_max, u_parts, column_max, shift, total = [], [], None, None, None
        for index, rows in enumerate(self.slices):
            logits = self._logits(index)
            peak = logits.amax(-1, keepdim=True)
            if rows_mass is not None:  # a row without mass keeps MASKED_LOGIT: E is 0 there
                peak = peak.masked_fill(~query_rows(rows_mass, rows), 0.0)
            logits.sub_(peak)
            valid_rows = query_rows(valid, rows)
            if valid_rows is not None:  # padded queries out of the maxima and of E (an addition: see add_mask_)
                logits.add_(torch.where(valid_rows, 0.0, MASKED_LOGIT).to(logits.dtype))
            here = logits.amax(-2, keepdim=True)
            column_max = here if column_max is None else torch.maximum(column_max, here)
            new_shift = torch.where(column_max > MASKED_LOGIT / 2, column_max, 0.0)
            if total is not None:  # c grew: rescale (a placeholder 0 leaves a sum of exact zeros)
                total.mul_((shift - new_shift).clamp_max(0.0).exp2())
            shift = new_shift
            kernel = logits.sub_(shift).exp2_()
            u = -row_sums(kernel, shift.exp2()).clamp_min(tiny).log()
            if rows_mass is not None:
                u = u.masked_fill(~query_rows(rows_mass, rows), 0.0)
            if valid_rows is not None:
                u = u.masked_fill(~valid_rows, 0.0)
            u_parts.append(u)
            row_max.append(peak)
            if column:  # this block's share of Σ_q E exp(u) (its padded rows are 0 in E)
                part = vector_times(u.exp().transpose(-1, -2), kernel)
                total = part if total is None else total.add_(part)
        if columns_mass is not None:
            shift = shift.masked_fill(~columns_mass, 0.0)
        self._set_offsets(torch.cat(row_max, -2) * LN2, shift * LN2)
        if not column:
            return torch.cat(u_parts, -2), None
        v = log_target - total.clamp_min(tiny).log()
        if columns_mass is not None:
            v = v.masked_fill(~columns_mass, 0.0)
        return torch.cat(u_parts, -2), v

    def block(self, index: int) -> Tensor:
        """E on block ``index`` (..., rows, Lk), in the scratch buffer: one product, one exponential."""
        rows = self.slices[index]
        left = torch.cat([self.query[..., rows, :], self._row_terms[..., rows, :]], -1)
        out = matmul_into(left, self._right, self.scratch(index))
        add_mask_(out, query_rows(self.bias, rows), query_rows(self.allowed, rows))
        if index in self._unsettled:
            self._settle_padded_rows(index, out)
        return out.exp2_()

    def _settle_padded_rows(self, index: int, logits: Tensor) -> None:
        """Shift the padded queries of block ``index`` by their own maximum of S - m - c (base-2 ``logits``, in
        place) and fold it into m: their rows then hold a 1 and nothing above, as the valid rows do."""
        rows = self.slices[index]
        valid = query_rows(self.support.query_valid, rows)
        extra = logits.amax(-1, keepdim=True).clamp_min(0.0).masked_fill(valid, 0.0)  # a row without mass: 0
        logits.sub_(extra)
        self.row_offset[..., rows, :] += extra * LN2
        self._row_terms[..., rows, :1] -= extra
        self._unsettled.discard(index)

    def plan(self, row_shift: Tensor, column_shift: Tensor | float, column: bool) -> BlockKernelPlan:
        """exp(log E + row_shift + column_shift) as E ⊙ x yᵀ (see :func:`.kernel.plan_scalings`)."""
        scalings = plan_scalings(self.column_offset, self.support.query_valid, row_shift, column_shift, column)
        return BlockKernelPlan(self, *scalings)

    def forward_steps(self, steps: int, value: Tensor) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """``steps`` half-steps (rows first) from v = 0 and the output A V, A = exp(S + u + v) with the last
        iterates: row potentials after each row step, column potentials (relative) after each column step."""
        support, tiny = self.support, torch.finfo(self.query.dtype).tiny
        u, v = self._first_steps(steps > 1)
        us, vs, output = [u], [] if v is None else [v], None
        for first in range(2, steps, 2):
            column = first + 1 < steps
            peak_v = v.amax(-1, keepdim=True)
            y = (v - peak_v).exp()
            values = None if column or steps % 2 == 0 else y.transpose(-1, -2) * value
            u_parts, out_parts, total, total_peak = [], [], None, None
            for index, rows in enumerate(self.slices):
                kernel = self.block(index)
                u = -(peak_v + row_sums(kernel, y).clamp_min(tiny).log())
                if support.row_has_mass is not None:
                    u = u.masked_fill(~query_rows(support.row_has_mass, rows), 0.0)
                u_parts.append(u)
                if column:  # this block's share of lse_q(log E + u) over the valid queries, online
                    valid = query_rows(support.query_valid, rows)
                    share = u if valid is None else u.masked_fill(~valid, MASKED_LOGIT)
                    peak = share.amax(-2, keepdim=True)
                    peak = peak if total_peak is None else torch.maximum(total_peak, peak)
                    # a block of padded rows only peaks at MASKED_LOGIT: the first valid row's peak rescales its
                    # sum by exp(MASKED_LOGIT - peak) = 0 (and a sequence with no valid row has no column mass)
                    part = vector_times((share - peak).exp().transpose(-1, -2), kernel)
                    total = part if total is None else total.mul_((total_peak - peak).exp()).add_(part)
                    total_peak = peak
                elif values is not None:
                    out_parts.append((u + peak_v).exp() * torch.matmul(kernel, values))
            us.append(torch.cat(u_parts, -2))
            if column:
                v = support.log_target - (total_peak + total.clamp_min(tiny).log())
                if support.column_has_mass is not None:
                    v = v.masked_fill(~support.column_has_mass, 0.0)
                vs.append(v)
            if out_parts:
                output = torch.cat(out_parts, -2)
        if output is None:  # even K (or K = 1): the last pass made no output
            output = self.plan(us[-1], vs[-1] if vs else 0.0, False).times_values(value)
        return us, vs, output


class BlockKernelPlan(Plan):
    """The plan E ⊙ x yᵀ with E recomputed block by block; x (..., Lq, 1), y (..., 1, Lk)."""

    def __init__(self, kernel: BlockKernel, x: Tensor, y: Tensor) -> None:
        self.kernel, self.x, self.y = kernel, x, y

    def times(self, weight: Tensor) -> Tensor:
        """(..., 1, Lk) -> (..., Lq, 1)."""
        weight = self.y * weight
        parts = [row_sums(self.kernel.block(i), weight) for i in range(len(self.kernel.slices))]
        return self.x * torch.cat(parts, -2)

    def rtimes(self, weight: Tensor) -> Tensor:
        """(..., Lq, 1) -> (..., 1, Lk)."""
        weight, total = self.x * weight, 0
        for index, rows in enumerate(self.kernel.slices):
            total = total + vector_times(weight[..., rows, :].transpose(-1, -2), self.kernel.block(index))
        return self.y * total

    def gram(self, weight: Tensor, row_weight: Tensor) -> Tensor:
        return self.rtimes(row_weight * self.times(weight))

    def block(self, index: int, out: Tensor | None = None) -> Tensor:
        rows = self.kernel.slices[index]
        kernel = self.kernel.block(index)
        out = kernel if out is None else out
        return torch.mul(kernel, self.x[..., rows, :], out=out).mul_(self.y)

    def times_values(self, value: Tensor) -> Tensor:
        """plan @ value, (..., Lk, Dv) -> (..., Lq, Dv)."""
        values = self.y.transpose(-1, -2) * value
        parts = [torch.matmul(self.kernel.block(i), values) for i in range(len(self.kernel.slices))]
        return self.x * torch.cat(parts, -2)

    def rtimes_values(self, grad: Tensor) -> Tensor:
        """planᵀ @ grad, (..., Lq, Dv) -> (..., Lk, Dv)."""
        grad = self.x * grad
        total = grad.new_zeros(*grad.shape[:-2], self.y.shape[-1], grad.shape[-1])
        for index, rows in enumerate(self.kernel.slices):
            add_product_(total, self.kernel.block(index).transpose(-1, -2), grad[..., rows, :])
        return total.mul_(self.y.transpose(-1, -2))


def _first_row_factor(deferred, block: Tensor, rows: slice, row_has_mass: Tensor | None) -> Tensor:
    """-x₀ ⊙ w₀ on the block's rows for the first row step's term, w₀ = -(Q₁ v̄) (masked to rows with mass): the
    column step's product is row-local, so it needs no pass of its own."""
    column_plan, weighted, row_plan = deferred
    pulled = column_plan.x[..., rows, :] * row_sums(block, weighted)
    if row_has_mass is not None:
        pulled = pulled.masked_fill(~query_rows(row_has_mass, rows), 0.0)
    return row_plan.x[..., rows, :] * pulled


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    return torch.matmul(a.unsqueeze(-2), b.unsqueeze(-1)).squeeze(-1)


class KernelStreamingAttention(torch.autograd.Function):
    """(query, key, value, bias, allowed, query_valid, options) -> output (..., Lq, Dv), for the calls
    :func:`kernel_streaming_supports` accepts."""

    @staticmethod
    def forward(ctx, query, key, value, bias, allowed, query_valid, options: RouteOptions):
        kernel = BlockKernel(query, key, bias, allowed, query_valid, options.scale, options.block_size)
        us, vs, output = kernel.forward_steps(options.settings.iterations, value)
        ctx.options, ctx.counts = options, (len(us), len(vs))
        offsets = (kernel.row_offset, kernel.column_offset)
        ctx.save_for_backward(query, key, value, bias, allowed, query_valid, output, *offsets, *us, *vs)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, bias, allowed, query_valid, output, row_offset, column_offset, *rest = ctx.saved_tensors
        options: RouteOptions = ctx.options
        n_us, _ = ctx.counts
        us, vs = list(rest[:n_us]), list(rest[n_us:])
        offsets = (row_offset, column_offset)
        kernel = BlockKernel(query, key, bias, allowed, query_valid, options.scale, options.block_size, offsets)
        support = kernel.support
        final = kernel.plan(us[-1], vs[-1], False)
        unrolled, deferred = options.settings.backward != "implicit", None
        weight = grad_u = _rowdot(grad_output, output)  # rowsum(A ⊙ dA) = dO·O, colsum(A ⊙ dA) = V·dV
        if support.row_has_mass is not None:
            weight = grad_u.masked_fill(~support.row_has_mass, 0.0)
        fused = unrolled and len(us) > len(vs)  # odd K: A is the last row step's plan, its Aᵀ w rides along with dV
        if fused:
            both = final.rtimes_values(torch.cat([grad_output, weight], -1))
            grad_value, pulled = both[..., :-1], both[..., -1:].transpose(-1, -2)
        else:
            grad_value = final.rtimes_values(grad_output)
        grad_v = _rowdot(value, grad_value).transpose(-1, -2)
        if not unrolled:
            terms = implicit_terms(final, grad_u, grad_v, support, options.solver)
        elif fused and len(vs) == 1:  # K = 3: the first row step's weight -Q1 w is row-local: made per block below
            column_weight = grad_v - pulled
            if support.column_has_mass is not None:
                column_weight = column_weight.masked_fill(~support.column_has_mass, 0.0)
            column_plan = kernel.plan(us[0], vs[0] - support.log_target, True)
            deferred = (column_plan, column_plan.y * column_weight, kernel.plan(us[0], 0.0, False))
            terms = [(final, weight, None), (column_plan, None, column_weight)]
        elif fused:  # the sweep from the column step before the last row step (which is done: v̄ = dv - Aᵀ w)
            plans = step_plans(kernel.plan, us, vs, support.log_target)[:-1]
            grad_vs = [None] * (len(vs) - 1) + [grad_v - pulled]
            terms = unrolled_terms(plans, [], [None] * n_us, grad_vs, support) + [(final, weight, None)]
        else:
            plans = step_plans(kernel.plan, us, vs, support.log_target)
            grad_us = [None] * (n_us - 1) + [grad_u]
            grad_vs = [None] * (len(vs) - 1) + [grad_v]
            terms = unrolled_terms(plans, [], grad_us, grad_vs, support)
        lefts, rights = [final.x * grad_output], [final.y.transpose(-1, -2) * value]
        if terms:
            left, right = rank_factors(terms)
            lefts.append(-left)
            rights.append(right.transpose(-1, -2))
        if deferred is not None:
            rights.append(deferred[2].y.transpose(-1, -2))
        lefts, rights = torch.cat(lefts, -1), torch.cat(rights, -1).transpose(-1, -2)
        targets = {
            "query": torch.zeros_like(query) if ctx.needs_input_grad[0] else None,
            "key": key.new_zeros(key.shape) if ctx.needs_input_grad[1] else None,
            "bias": torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[3] else None,
        }
        if any(target is not None for target in targets.values()):
            grad_scores = torch.empty_like(kernel.scratch(0))
            for index, rows in enumerate(kernel.slices):
                out = grad_scores[..., : rows.stop - rows.start, :]
                block, left = kernel.block(index), lefts[..., rows, :]
                if deferred is not None:
                    left = torch.cat([left, _first_row_factor(deferred, block, rows, support.row_has_mass)], -1)
                matmul_into(left, rights, out).mul_(block)
                contract(query, key, options.scale, rows, out, targets)
        grad_value = grad_value if ctx.needs_input_grad[2] else None
        return targets["query"], targets["key"], grad_value, targets["bias"], None, None, None
