"""Score geometry: the support and marginals of the Sinkhorn problem, scores visited in blocks of query rows, and
the :class:`Plan` interface every route's plans share.

``S = scale·Q Kᵀ + bias`` (..., Lq, Lk) is never needed whole: row reductions (over keys) are complete inside a
block of queries, column reductions (over queries) are accumulated across blocks with an online logsumexp, and
gradients are contracted into dQ, dK block by block. One block holding every query is the dense mode (S is
computed once and kept); smaller blocks are the streaming mode (S is recomputed block by block at every pass,
so extra memory is O(block·Lk) per head instead of O(Lq·Lk)).

Blocks hold logits in base 2, x·log2 e, so that e^x is computed as 2^(x·log2 e): on CPU torch's exp takes a slow
path, 10–40× slower, for every input below about -87 (masked entries, far-off scores), and exp2 does not. The
factor rides on the query scaling and the shift additions, so it costs no pass; potentials stay natural.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

# Finite on purpose: exp() of it is exactly 0 in float32/64, and unlike -inf it never produces
# inf - inf = NaN in a logsumexp (or its gradient) over a fully masked row.
MASKED_LOGIT = -1e30


LOG2E, LN2 = 1 / math.log(2), math.log(2)


def lse_(x: Tensor, dim: int) -> Tensor:
    """Natural logsumexp along ``dim`` (kept) of logits ``x`` given in base 2, overwriting ``x``: one buffer
    instead of torch's three."""
    peak = x.amax(dim, keepdim=True)
    return x.sub_(peak).exp2_().sum(dim, keepdim=True).log2_().add_(peak).mul_(LN2)


def query_rows(mask: Tensor | None, rows: slice) -> Tensor | None:
    """The query rows ``rows`` of a mask broadcastable to (..., Lq, ·); masks constant over queries stay whole."""
    if mask is None or mask.shape[-2] == 1:
        return mask
    return mask[..., rows, :]


def query_blocks(n_q: int, block_size: int) -> list[slice]:
    """Blocks of ``block_size`` query rows (the last one may be shorter)."""
    size = max(1, min(block_size, n_q))
    return [slice(start, min(start + size, n_q)) for start in range(0, n_q, size)]


def add_product_(target: Tensor, a: Tensor, b: Tensor, alpha: float = 1.0) -> Tensor:
    """target += alpha·(a @ b) summed to target's shape; in place with no (..., M, N) temporary (a batched
    baddbmm_) when the batch shapes agree: accumulating a product per block out of place costs as much as the
    product (measured: a third of the streaming backward at N=2048)."""
    batch = target.shape[:-2]
    if target.dim() >= 3 and a.shape[:-2] == batch == b.shape[:-2] and target.is_contiguous():
        flat = target.view(-1, *target.shape[-2:])
        flat.baddbmm_(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]), alpha=alpha)
    else:
        target += torch.matmul(a, b).mul_(alpha).sum_to_size(target.shape)
    return target


def contract(query: Tensor, key: Tensor, scale: float, rows: slice, grad_scores: Tensor, grads: dict) -> None:
    """Add the gradient of the query rows ``rows`` of S = scale·Q Kᵀ + bias, ``grad_scores`` (..., rows, Lk), into
    ``grads["query"]`` (rows written), ``grads["key"]`` and ``grads["bias"]`` (accumulated; None: not wanted)."""
    if grads.get("query") is not None:
        part = torch.matmul(grad_scores, key).mul_(scale)
        grads["query"][..., rows, :] += part.sum_to_size(grads["query"][..., rows, :].shape)
    if grads.get("key") is not None:
        add_product_(grads["key"], grad_scores.transpose(-1, -2), query[..., rows, :], scale)
    if grads.get("bias") is not None:
        target = query_rows(grads["bias"], rows)
        target += grad_scores.sum_to_size(target.shape)


class MarginalSupport(NamedTuple):
    """Which rows and columns carry mass, the valid queries, and the column target log(n_q / n_k).

    row_has_mass (..., Lq, 1), column_has_mass (..., 1, Lk), query_valid (..., Lq, 1): bool or None (all);
    log_target: (..., 1, 1) tensor, or a number when nothing is masked.
    """

    row_has_mass: Tensor | None
    column_has_mass: Tensor | None
    query_valid: Tensor | None
    log_target: Tensor | float


def marginal_support(
    allowed: Tensor | None, query_valid: Tensor | None, n_q: int, n_k: int, dtype: torch.dtype, blocks: list[slice]
) -> MarginalSupport:
    """The support of the Sinkhorn problem; the column masks are visited one block of query rows at a time."""
    row_has_mass = None if allowed is None else allowed.any(dim=-1, keepdim=True)
    column_has_mass = None
    if allowed is not None or query_valid is not None:
        for rows in blocks:
            mask = column_mask(allowed, query_valid, rows)
            any_here = mask.expand(*mask.shape[:-1], n_k).any(dim=-2, keepdim=True)
            column_has_mass = any_here if column_has_mass is None else column_has_mass | any_here
    if column_has_mass is None:
        return MarginalSupport(None, None, None, math.log(n_q / n_k))
    count_q = query_valid.sum(dim=-2, keepdim=True) if query_valid is not None else torch.tensor(n_q)
    count_k = column_has_mass.sum(dim=-1, keepdim=True)
    log_target = (count_q.clamp(min=1).to(dtype) / count_k.clamp(min=1).to(dtype)).log()
    return MarginalSupport(row_has_mass, column_has_mass, query_valid, log_target)


def column_mask(allowed: Tensor | None, query_valid: Tensor | None, rows: slice) -> Tensor | None:
    """Entries of query rows ``rows`` that count in the column marginals: allowed and from a valid query."""
    allowed, valid = query_rows(allowed, rows), query_rows(query_valid, rows)
    if allowed is None or valid is None:
        return allowed if valid is None else valid
    return allowed & valid


class ScoreBlocks:
    """Blocks of ``S = scale·Q Kᵀ + bias`` and the Sinkhorn support.

    query (..., Lq, D), key (..., Lk, D), float; ``bias`` broadcastable to (..., Lq, Lk) or None; ``allowed``
    bool broadcastable to (..., Lq, Lk) or None (everything); ``query_valid`` bool (..., Lq, 1) or None (every
    query). ``block_size`` queries per block (None: one block). ``workspace`` (``.empty(purpose, shape, dtype,
    device)``, e.g. :data:`.dense.WORKSPACE`) supplies the score buffers when given: they must not outlive the call.
    """

    def __init__(
        self,
        query: Tensor,
        key: Tensor,
        bias: Tensor | None,
        allowed: Tensor | None,
        query_valid: Tensor | None,
        scale: float,
        block_size: int | None,
        workspace=None,
    ) -> None:
        self.query, self.key, self.bias, self.scale = query, key, bias, scale
        self.allowed, self.query_valid = allowed, query_valid
        n_q, n_k = query.shape[-2], key.shape[-2]
        if block_size is None:  # one block, written without comparing lengths: export keeps them symbolic
            size, self.slices = n_q, [slice(0, n_q)]
        else:
            size = max(1, min(block_size, n_q))
            self.slices = query_blocks(n_q, size)
        self.dense = len(self.slices) == 1
        self.batch_shape = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2])
        # One reusable (..., block, Lk) buffer: fresh N² allocations cost page faults on every pass.
        shape = (*self.batch_shape, size, n_k)
        if workspace is None:
            self._scratch = torch.empty(shape, dtype=query.dtype, device=query.device)
            scores = torch.empty_like(self._scratch) if self.dense else None
        else:
            self._scratch = workspace.empty("scratch", shape, query.dtype, query.device)
            scores = workspace.empty("scores", shape, query.dtype, query.device) if self.dense else None
        self._scores = None
        if scores is not None:  # kept for the call with the row support folded in: no masking pass per step
            self._scores = self._compute(self.slices[0], scores)
            if allowed is not None:
                self._scores.masked_fill_(~allowed, MASKED_LOGIT)

        self.support = marginal_support(allowed, query_valid, n_q, n_k, query.dtype, self.slices)
        self.row_has_mass, self.column_has_mass, _, self.log_target = self.support

    # --- scores and masks per block ------------------------------------------------------------------------

    def _compute(self, rows: slice, out: Tensor) -> Tensor:
        # scale the (rows, D) query block, not the (rows, Lk) scores, and never copy all of Q
        query = self.query[..., rows, :] * (self.scale * LOG2E)  # base-2 logits
        if torch.compiler.is_compiling():  # dynamo refuses out= views; the compiled graph plans its buffers anyway
            out.copy_(torch.matmul(query, self.key.transpose(-1, -2)))
        else:
            torch.matmul(query, self.key.transpose(-1, -2), out=out)
        bias = query_rows(self.bias, rows)
        return out if bias is None else out.add_(bias, alpha=LOG2E)

    def scratch(self, index: int) -> Tensor:
        """The shared (..., rows, Lk) buffer for block ``index``: valid until the next call that uses it."""
        rows = self.slices[index]
        return self._scratch[..., : rows.stop - rows.start, :]

    # --- the three things Sinkhorn does with a block ---------------------------------------------------------

    def logits(
        self,
        index: int,
        row_shift: Tensor | None,
        column_shift: Tensor | float,
        column: bool,
        out: Tensor | None = None,
    ) -> Tensor:
        """``(S + row_shift + column_shift)·log2 e`` on block ``index`` (base-2 logits) with MASKED_LOGIT outside the
        support (of the rows if not ``column``, of the column marginals if ``column``), written into ``out`` or the
        scratch buffer.

        Masked entries end at MASKED_LOGIT plus a finite shift (or twice MASKED_LOGIT): exactly zero mass. Padded
        queries leave the column marginals through their row shift, a vector, instead of an N² mask."""
        rows = self.slices[index]
        out = self.scratch(index) if out is None else out
        if row_shift is not None:
            row_shift = row_shift[..., rows, :]
        if column and self.query_valid is not None:
            valid = query_rows(self.query_valid, rows)
            row_shift = torch.where(valid, 0.0 if row_shift is None else row_shift, MASKED_LOGIT)
        if self._scores is not None:
            torch.add(self._scores[..., rows, :], column_shift, alpha=LOG2E, out=out)
        else:
            self._compute(rows, out)
            if self.allowed is not None:
                out.masked_fill_(~query_rows(self.allowed, rows), MASKED_LOGIT)
            if isinstance(column_shift, Tensor) or column_shift != 0:
                out.add_(column_shift, alpha=LOG2E)
        return out if row_shift is None else out.add_(row_shift, alpha=LOG2E)

    def plan(self, row_shift: Tensor, column_shift: Tensor | float, column: bool) -> BlockPlan:
        """exp(S + row_shift + column_shift) on the row (or column-marginal) support, visited block by block."""
        return BlockPlan(self, row_shift, column_shift, column)

    def row_lse(self, v: Tensor) -> Tensor:
        """logsumexp over allowed keys of S + v, per query (..., Lq, 1)."""
        parts = [lse_(self.logits(i, None, v, column=False), -1) for i in range(len(self.slices))]
        return parts[0] if self.dense else torch.cat(parts, -2)

    def column_lse(self, u: Tensor) -> Tensor:
        """logsumexp over valid queries of S + u, per key (..., 1, Lk), accumulated online across blocks."""
        total = None
        for index in range(len(self.slices)):
            part = lse_(self.logits(index, u, 0.0, column=True), -2)
            total = part if total is None else torch.logaddexp(total, part)
        return total

    def contract(self, index: int, grad_scores: Tensor, grads: dict[str, Tensor | None]) -> None:
        """Add the gradient of block ``index`` of S, ``grad_scores`` (..., rows, Lk), into ``grads`` (see
        :func:`contract`)."""
        contract(self.query, self.key, self.scale, self.slices[index], grad_scores, grads)


class Plan(Protocol):
    """A plan P (..., Lq, Lk), e.g. exp(S + u 1ᵀ + 1 vᵀ) on a support, known through products with it.

    Implemented by :class:`BlockPlan` (recomputed score blocks) and :class:`.dense.StoredPlan` (a plan held whole); the
    reverse sweeps (:mod:`.iterations`, :mod:`.implicit`) use nothing else.
    """

    def times(self, weight: Tensor) -> Tensor:
        """P w: (..., 1, Lk) -> (..., Lq, 1)."""

    def rtimes(self, weight: Tensor) -> Tensor:
        """Pᵀ w: (..., Lq, 1) -> (..., 1, Lk)."""

    def gram(self, weight: Tensor, row_weight: Tensor) -> Tensor:
        """Pᵀ (row_weight ⊙ P w): (..., 1, Lk) -> (..., 1, Lk)."""

    def block(self, index: int, out: Tensor | None = None) -> Tensor:
        """P on block ``index`` of query rows (..., rows, Lk), written into ``out`` when given."""


class BlockPlan(Plan):
    """The plan exp(S + a 1ᵀ + 1 bᵀ) on the row support (``column=False``) or on the column-marginal support,
    visited block by block (each product recomputes the blocks' exponentials)."""

    def __init__(self, blocks: ScoreBlocks, row_shift: Tensor, column_shift: Tensor | float, column: bool) -> None:
        self.blocks, self.row_shift, self.column_shift, self.column = blocks, row_shift, column_shift, column

    def block(self, index: int, out: Tensor | None = None) -> Tensor:
        """The plan on block ``index`` (..., rows, Lk), in ``out`` or the blocks' scratch buffer."""
        return self.blocks.logits(index, self.row_shift, self.column_shift, self.column, out).exp2_()

    def times(self, weight: Tensor) -> Tensor:
        """Σ_k plan_qk weight_k: (..., 1, Lk) -> (..., Lq, 1)."""
        parts = [torch.matmul(self.block(i), weight.transpose(-1, -2)) for i in range(len(self.blocks.slices))]
        return parts[0] if len(parts) == 1 else torch.cat(parts, -2)

    def rtimes(self, weight: Tensor) -> Tensor:
        """Σ_q weight_q plan_qk: (..., Lq, 1) -> (..., 1, Lk)."""
        total = 0
        for index, rows in enumerate(self.blocks.slices):
            total = total + torch.matmul(weight[..., rows, :].transpose(-1, -2), self.block(index))
        return total

    def gram(self, weight: Tensor, row_weight: Tensor) -> Tensor:
        """planᵀ (row_weight ⊙ plan weight), (..., 1, Lk) -> (..., 1, Lk), one exponential per block."""
        total = 0
        for index, rows in enumerate(self.blocks.slices):
            plan = self.block(index)
            image = torch.matmul(plan, weight.transpose(-1, -2)) * query_rows(row_weight, rows)
            total = total + torch.matmul(image.transpose(-1, -2), plan)
        return total
