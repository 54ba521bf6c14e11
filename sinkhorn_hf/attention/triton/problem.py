"""The inputs of one Triton Sinkhorn call laid out for the kernels (see :mod:`.tiles` for the tuple layout).

Masks and bias are broadcast with stride-0 views (nothing N×N is materialised that the caller did not pass);
the potentials and per-row/per-column vectors are contiguous float32 (batch·H, L) tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from torch import Tensor


def _rows_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@dataclass
class Problem:
    """query (B, H, Lq, D), key (B, H, Lk, D), value (B, H, Lk, Dv); bias broadcastable to (B, H, Lq, Lk) or None;
    allowed bool broadcastable to (B, H, Lq, Lk); query_valid bool broadcastable to (B, H, Lq)."""

    query: Tensor
    key: Tensor
    value: Tensor
    bias: Tensor | None
    allowed: Tensor
    query_valid: Tensor
    scale: float
    block_m: int
    block_n: int

    def __post_init__(self) -> None:
        self.query, self.key, self.value = map(_rows_contiguous, (self.query, self.key, self.value))
        batch, heads, n_q, _ = self.query.shape
        n_k = self.key.shape[-2]
        full = (batch, heads, n_q, n_k)
        # bool -> uint8 is a reinterpretation (same element size), so broadcast views stay views
        self._allowed = self.allowed.expand(full).view(torch.uint8)
        self._valid = self.query_valid.expand(batch, heads, n_q).view(torch.uint8)
        self._bias = None if self.bias is None else self.bias.expand(full)

    @property
    def rows(self) -> int:
        """batch·H"""
        return self.query.shape[0] * self.query.shape[1]

    @property
    def n_q(self) -> int:
        return self.query.shape[-2]

    @property
    def n_k(self) -> int:
        return self.key.shape[-2]

    @property
    def has_bias(self) -> bool:
        return self._bias is not None

    def kernel_args(self) -> tuple[tuple, tuple, tuple]:
        """(P, ST, N) for the kernels."""
        bias = self.query if self._bias is None else self._bias  # never read without HAS_BIAS
        tensors = (self.query, self.key, self.value, bias, self._allowed, self._valid)
        strides = (
            self.query.stride()[:3],
            self.key.stride()[:3],
            self.value.stride()[:3],
            (0, 0, 0, 0) if self._bias is None else self._bias.stride(),
            self._allowed.stride(),
            self._valid.stride(),
        )
        dims = (self.query.shape[1], self.n_q, self.n_k, self.query.shape[-1], self.value.shape[-1], self.scale)
        return tensors, strides, dims

    def blocks(self) -> dict[str, int]:
        """The block-size constexprs every kernel takes."""
        return {
            "BLOCK_M": self.block_m,
            "BLOCK_N": self.block_n,
            "BLOCK_D": max(16, triton.next_power_of_2(self.query.shape[-1])),
            "BLOCK_DV": max(16, triton.next_power_of_2(self.value.shape[-1])),
            "HAS_BIAS": self.has_bias,
        }

    def query_grid(self) -> tuple[int, int]:
        return (triton.cdiv(self.n_q, self.block_m), self.rows)

    def key_grid(self) -> tuple[int, int]:
        return (triton.cdiv(self.n_k, self.block_n), self.rows)

    def row_vector(self, fill: float = 0.0) -> Tensor:
        """A float32 (batch·H, Lq) vector."""
        return torch.full((self.rows, self.n_q), fill, dtype=torch.float32, device=self.query.device)

    def column_vector(self, fill: float = 0.0) -> Tensor:
        """A float32 (batch·H, Lk) vector."""
        return torch.full((self.rows, self.n_k), fill, dtype=torch.float32, device=self.query.device)

    def valid_rows(self) -> Tensor:
        """Which queries are valid: (batch·H, Lq) bool."""
        return self.query_valid.expand(*self.query.shape[:3]).reshape(self.rows, self.n_q)

    def query_count(self) -> Tensor:
        """n_q, the valid queries per (batch, head): (batch·H, 1) float32."""
        return self._valid.reshape(self.rows, self.n_q).sum(-1, keepdim=True, dtype=torch.float32)
