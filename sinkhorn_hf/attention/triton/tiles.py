"""Triton building blocks shared by the forward and backward kernels: one (BLOCK_M queries × BLOCK_N keys) tile.

Every kernel takes the problem as three tuples (built by :class:`.problem.Problem`):
``P = (Q, K, V, BIAS, ALLOWED, VALID)`` tensors, ``ST`` their strides ((b, h, row) for Q, K, V; (b, h, q, k) for
BIAS and ALLOWED; (b, h, q) for VALID), ``N = (H, Lq, Lk, D, Dv, scale)``. Grid axis 1 is batch·H + head.
On a tile, S = scale·Q Kᵀ + bias, and the two supports of the Sinkhorn problem are the row support (allowed
entries) and the column-marginal support (allowed entries of valid queries). Entries outside a support (or past
the sequence lengths) get ``MASKED_LOGIT`` before any exponential: exactly zero mass, never an overflow.
Kernels are decorated when this module is first imported, in the mode Triton is in then (:data:`INTERPRETED`:
``TRITON_INTERPRET=1`` runs them on CPU tensors).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..sinkhorn import MASKED_LOGIT

INTERPRETED: bool = bool(triton.knobs.runtime.interpret)
MASKED = tl.constexpr(MASKED_LOGIT)
# The interpreter multiplies bfloat16 tiles as raw bits: there, products are taken in float32.
_UPCAST_DOT = tl.constexpr(INTERPRETED)


@triton.jit
def dot(a, b):
    """a @ b with float32 accumulation (IEEE float32 products for float32 tiles, no TF32)."""
    if _UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def load_rows(P, ST, N, which: tl.constexpr, offs, offs_d):
    """Rows ``offs`` of this (batch, head)'s Q (which=0), K (1) or V (2), (len(offs), BLOCK_D); zero outside."""
    # (batch, head) offsets are inlined: each nested jit call costs milliseconds in the interpreter
    batch, head = tl.program_id(1) // N[0], tl.program_id(1) % N[0]
    base = P[which] + batch * ST[which][0] + head * ST[which][1]
    length = N[1] if which == 0 else N[2]
    dim = N[4] if which == 2 else N[3]
    mask = (offs[:, None] < length) & (offs_d[None, :] < dim)
    return tl.load(base + offs[:, None] * ST[which][2] + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def load_vector(base, offs, length):
    """Entries ``offs`` of this (batch, head)'s row of a contiguous float32 (batch·H, length) tensor; zero outside."""
    return tl.load(base + tl.program_id(1) * length + offs, mask=offs < length, other=0.0)


@triton.jit
def store_vector(base, offs, length, value):
    """Write ``value`` at ``offs`` of this (batch, head)'s row of a contiguous (batch·H, length) tensor."""
    tl.store(base + tl.program_id(1) * length + offs, value, mask=offs < length)


@triton.jit
def score_tile(P, ST, N, q, k, offs_m, offs_n, HAS_BIAS: tl.constexpr):
    """S = scale·q kᵀ (+ bias) in float32; q (BLOCK_M, BLOCK_D), k (BLOCK_N, BLOCK_D)."""
    s = dot(q, tl.trans(k)) * N[5]
    if HAS_BIAS:
        batch, head = tl.program_id(1) // N[0], tl.program_id(1) % N[0]
        base = P[3] + batch * ST[3][0] + head * ST[3][1]
        inside = (offs_m[:, None] < N[1]) & (offs_n[None, :] < N[2])
        ptrs = base + offs_m[:, None] * ST[3][2] + offs_n[None, :] * ST[3][3]
        s += tl.load(ptrs, mask=inside, other=0.0).to(tl.float32)
    return s


@triton.jit
def support_tile(P, ST, N, offs_m, offs_n, COLUMN: tl.constexpr):
    """The row support (allowed entries) or, if COLUMN, the column-marginal support (allowed and valid query)."""
    inside = (offs_m[:, None] < N[1]) & (offs_n[None, :] < N[2])
    batch, head = tl.program_id(1) // N[0], tl.program_id(1) % N[0]
    base = P[4] + batch * ST[4][0] + head * ST[4][1]
    allowed = tl.load(base + offs_m[:, None] * ST[4][2] + offs_n[None, :] * ST[4][3], mask=inside, other=0)
    inside = inside & (allowed != 0)
    if COLUMN:
        base = P[5] + batch * ST[5][0] + head * ST[5][1]
        valid = tl.load(base + offs_m * ST[5][2], mask=offs_m < N[1], other=0)
        inside = inside & (valid[:, None] != 0)
    return inside


@triton.jit
def shifted_logits(s, support, row_shift, column_shift):
    """S + row_shift 1ᵀ + 1 column_shiftᵀ on the support, MASKED_LOGIT elsewhere."""
    return tl.where(support, s + row_shift[:, None] + column_shift[None, :], MASKED)


@triton.jit
def load_matrix(base, offs, length, offs_d, dim):
    """Rows ``offs`` of this (batch, head)'s slice of a contiguous (batch·H, length, dim) tensor; zero outside."""
    base += tl.program_id(1) * length * dim
    mask = (offs[:, None] < length) & (offs_d[None, :] < dim)
    return tl.load(base + offs[:, None] * dim + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def store_matrix(base, offs, length, offs_d, dim, value):
    """Write rows ``offs`` of this (batch, head)'s slice of a contiguous (batch·H, length, dim) tensor."""
    base += tl.program_id(1) * length * dim
    mask = (offs[:, None] < length) & (offs_d[None, :] < dim)
    tl.store(base + offs[:, None] * dim + offs_d[None, :], value, mask=mask)
