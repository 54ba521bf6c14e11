"""Attention scores visited in blocks of query rows, with the support of the Sinkhorn problem.

``S = scale·Q Kᵀ + bias`` (..., Lq, Lk) is never needed whole: row reductions (over keys) are complete inside a
block of queries, column reductions (over queries) are accumulated across blocks with an online logsumexp, and
gradients are contracted into dQ, dK block by block. One block holding every query is the dense mode (S is
computed once and kept); smaller blocks are the streaming mode (S is recomputed block by block at every pass,
so extra memory is O(block·Lk) per head instead of O(Lq·Lk)).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .sinkhorn import MASKED_LOGIT


def lse_(x: Tensor, dim: int) -> Tensor:
    """logsumexp of ``x`` along ``dim`` (kept), overwriting ``x``: one buffer instead of torch's three."""
    peak = x.amax(dim, keepdim=True)
    return x.sub_(peak).exp_().sum(dim, keepdim=True).log_().add_(peak)


def _rows(mask: Tensor | None, rows: slice) -> Tensor | None:
    """The query rows ``rows`` of a mask broadcastable to (..., Lq, ·); masks constant over queries stay whole."""
    if mask is None or mask.shape[-2] == 1:
        return mask
    return mask[..., rows, :]


class ScoreBlocks:
    """Blocks of ``S = scale·Q Kᵀ + bias`` and the Sinkhorn support.

    query (..., Lq, D), key (..., Lk, D), float; ``bias`` broadcastable to (..., Lq, Lk) or None; ``allowed``
    bool broadcastable to (..., Lq, Lk) or None (everything); ``query_valid`` bool (..., Lq, 1) or None (every
    query). ``block_size`` queries per block (None: one block). ``scores``: S itself when already computed.
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
        scores: Tensor | None = None,
    ) -> None:
        self.query, self.key, self.bias, self.scale = query, key, bias, scale
        self.allowed, self.query_valid = allowed, query_valid
        n_q, n_k = query.shape[-2], key.shape[-2]
        size = n_q if block_size is None else max(1, min(block_size, n_q))
        self.slices = [slice(start, min(start + size, n_q)) for start in range(0, n_q, size)]
        self.dense = len(self.slices) == 1
        self.batch_shape = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2])
        self._scores = scores
        if self._scores is None and self.dense:
            self._scores = self._compute(self.slices[0])
        self._blocked: dict[tuple[int, bool], Tensor | None] = {}

        # Support: rows and columns that carry mass, and the column target log(n_q / n_k).
        self.row_has_mass = None if allowed is None else allowed.any(dim=-1, keepdim=True)
        column_has_mass = None
        if allowed is not None or query_valid is not None:
            for index in range(len(self.slices)):
                mask = self.column_mask(index)
                mask = mask.expand(*mask.shape[:-1], n_k)
                any_here = mask.any(dim=-2, keepdim=True)
                column_has_mass = any_here if column_has_mass is None else column_has_mass | any_here
        self.column_has_mass = column_has_mass
        dtype = query.dtype
        if column_has_mass is None:
            self.log_target: Tensor | float = math.log(n_q / n_k)
        else:
            count_q = query_valid.sum(dim=-2, keepdim=True) if query_valid is not None else torch.tensor(n_q)
            count_k = column_has_mass.sum(dim=-1, keepdim=True)
            self.log_target = (count_q.clamp(min=1).to(dtype) / count_k.clamp(min=1).to(dtype)).log()

    # --- scores and masks per block ------------------------------------------------------------------------

    def _compute(self, rows: slice) -> Tensor:
        scores = torch.matmul(self.query[..., rows, :], self.key.transpose(-1, -2)).mul_(self.scale)
        bias = _rows(self.bias, rows)
        return scores if bias is None else scores.add_(bias)

    @property
    def cached_scores(self) -> Tensor | None:
        """S (..., Lq, Lk) in the dense mode, None when streaming."""
        return self._scores

    def scores(self, index: int) -> Tensor:
        """S for block ``index`` (..., rows, Lk); do not modify it (it may be the cached S)."""
        rows = self.slices[index]
        if self._scores is not None:
            return self._scores[..., rows, :]
        return self._compute(rows)

    def column_mask(self, index: int) -> Tensor | None:
        """Entries of block ``index`` that count in the column marginals: allowed and from a valid query."""
        rows = self.slices[index]
        allowed, valid = _rows(self.allowed, rows), _rows(self.query_valid, rows)
        if allowed is None or valid is None:
            return allowed if valid is None else valid
        return allowed & valid

    def _blocked_entries(self, index: int, column: bool) -> Tensor | None:
        if (index, column) in self._blocked:
            return self._blocked[(index, column)]
        mask = self.column_mask(index) if column else _rows(self.allowed, self.slices[index])
        blocked = None if mask is None else ~mask
        if self.dense:  # one block: worth keeping across passes
            self._blocked[(index, column)] = blocked
        return blocked

    # --- the three things Sinkhorn does with a block ---------------------------------------------------------

    def logits(self, index: int, row_shift: Tensor | None, column_shift: Tensor | float, column: bool) -> Tensor:
        """A fresh buffer ``S + row_shift + column_shift`` on block ``index`` with MASKED_LOGIT outside the
        support (of the rows if not ``column``, of the column marginals if ``column``)."""
        scores = self.scores(index)
        out = scores + column_shift if isinstance(column_shift, Tensor) else scores.add(column_shift)
        if row_shift is not None:
            out.add_(row_shift[..., self.slices[index], :])
        blocked = self._blocked_entries(index, column)
        return out if blocked is None else out.masked_fill_(blocked, MASKED_LOGIT)

    def row_lse(self, v: Tensor) -> Tensor:
        """logsumexp over allowed keys of S + v, per query (..., Lq, 1)."""
        return torch.cat([lse_(self.logits(i, None, v, column=False), -1) for i in range(len(self.slices))], -2)

    def column_lse(self, u: Tensor) -> Tensor:
        """logsumexp over valid queries of S + u, per key (..., 1, Lk), accumulated online across blocks."""
        total = None
        for index in range(len(self.slices)):
            part = lse_(self.logits(index, u, 0.0, column=True), -2)
            total = part if total is None else torch.logaddexp(total, part)
        return total

    def contract(self, index: int, grad_scores: Tensor, grads: dict[str, Tensor | None]) -> None:
        """Add the gradient of block ``index`` of S, ``grad_scores`` (..., rows, Lk), into
        ``grads["query"]`` (rows written), ``grads["key"]`` and ``grads["bias"]`` (accumulated)."""
        rows = self.slices[index]
        if grads.get("query") is not None:
            part = torch.matmul(grad_scores, self.key).mul_(self.scale)
            grads["query"][..., rows, :] += part.sum_to_size(grads["query"][..., rows, :].shape)
        if grads.get("key") is not None:
            part = torch.matmul(grad_scores.transpose(-1, -2), self.query[..., rows, :]).mul_(self.scale)
            grads["key"] += part.sum_to_size(grads["key"].shape)
        if grads.get("bias") is not None:
            target = _rows(grads["bias"], rows)
            target += grad_scores.sum_to_size(target.shape)
