"""Public entry points: ``triton_sinkhorn_attention`` and ``triton_unsupported_reason`` for the router.

Importable without Triton installed: the kernels are imported on the first call. Attention dropout, early
stopping (``tolerance``) and the implicit backward are not in the kernels; the router checks
:func:`triton_unsupported_reason` and falls back to the PyTorch routes (a direct call raises
:class:`TritonUnsupportedError`, a ``NotImplementedError``).
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys

import torch
from torch import Tensor

from ..settings import check_iterations

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HEAD_DIMS = (16, 128)  # inclusive; tl.dot needs 16, larger tiles would not fit in registers/shared memory
_KERNELS = "sinkhorn_hf.attention.triton.tiles"


class TritonUnsupportedError(NotImplementedError):
    """This case cannot run on the Triton kernels; the message says why (use a PyTorch route)."""


def _interpreting() -> bool:
    """Whether the kernels run (or, once imported, will run) in Triton's CPU interpreter."""
    kernels = sys.modules.get(_KERNELS)
    if kernels is not None:
        return kernels.INTERPRETED
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_unsupported_reason(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    dropout: float = 0.0,
    tolerance: float | None = None,
    backward: str = "unrolled",
) -> str | None:
    """Why this call cannot run on the Triton kernels, or None if it can.

    query (B, H, Lq, D), key (B, H, Lk, D), value (B, H, Lk, Dv).
    """
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if dropout:
        return f"attention dropout ({dropout}) is not fused into the Triton kernels"
    if tolerance is not None:
        return "early stopping (tolerance) is not supported by the Triton kernels"
    if backward != "unrolled":
        return f"the Triton kernels only have the 'unrolled' backward, not {backward!r}"
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return "the Triton kernels take (batch, heads, length, head_dim) query, key and value"
    if query.shape[:2] != key.shape[:2] or key.shape[:-1] != value.shape[:-1] or query.shape[-1] != key.shape[-1]:
        return (
            f"the Triton kernels need matching batch and heads (no broadcasting or grouped heads), got query "
            f"{tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
        )
    if not query.dtype == key.dtype == value.dtype or query.dtype not in SUPPORTED_DTYPES:
        return f"the Triton kernels take one of float32/float16/bfloat16 for all inputs, got {query.dtype}, " + (
            f"{key.dtype}, {value.dtype}"
        )
    low, high = HEAD_DIMS
    if not (low <= query.shape[-1] <= high and low <= value.shape[-1] <= high):
        return f"the Triton kernels support head dims {low}..{high}, got {query.shape[-1]} and {value.shape[-1]}"
    if query.is_cuda and key.is_cuda and value.is_cuda:
        return None
    if not _interpreting():
        return (
            "the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before the kernels are first "
            "imported, to run them on CPU in Triton's interpreter)"
        )
    return None


def default_tiles(dtype: torch.dtype) -> tuple[int, int]:
    """(block_m, block_n) that fit one block's shared memory on every GPU of compute capability 8.0 and up (the
    least is 101 376 B, on sm_86/89/120), head dims up to 128: 64 × 64 for float16/bfloat16 (needs at most
    82 432 B on sm_86), 32 × 32 for float32 (94 592 B), where 64 × 64 needs 131 840 B at D=64 and 213 760 B at
    D=128 (over an A100's 166 912 B). Measured with scripts/compile_triton_kernels.py."""
    return (64, 64) if dtype.itemsize <= 2 else (32, 32)


def _check_block(name: str, size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 16 or size & (size - 1):
        raise ValueError(f"{name} must be a power of two >= 16 (a Triton tile dimension), got {size!r}")


def triton_sinkhorn_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    iterations: int,
    allowed: Tensor | None = None,
    bias: Tensor | None = None,
    query_valid: Tensor | None = None,
    scale: float | None = None,
    dropout: float = 0.0,
    block_m: int | None = None,
    block_n: int | None = None,
) -> Tensor:
    """O = A V with A = exp(S + u 1ᵀ + 1 vᵀ) after ``iterations`` K Sinkhorn half-steps (rows first, K = 1 is
    SoftMax) on S = scale·Q Kᵀ + bias, as fused Triton kernels (forward and exact backward).

    query (B, H, Lq, D), key (B, H, Lk, D), value (B, H, Lk, Dv) -> (B, H, Lq, Dv) in value's dtype (float32
    accumulation). ``allowed`` bool (B, 1|H, Lq|1, Lk), True = may carry mass (default: all); ``bias`` float,
    broadcastable to (B, H, Lq, Lk), differentiable; ``query_valid`` bool (B, 1|H, Lq, 1): padded queries are
    left out of the column marginals and, for even K, take one more row step (default: all valid, no extra step).
    ``scale`` defaults to 1/sqrt(D). ``block_m`` queries and ``block_n`` keys per tile (default:
    :func:`default_tiles`). Raises :class:`TritonUnsupportedError` where :func:`triton_unsupported_reason` gives
    a reason (e.g. ``dropout`` > 0).
    """
    check_iterations(iterations, "iterations")
    default_m, default_n = default_tiles(query.dtype)
    block_m = default_m if block_m is None else block_m
    block_n = default_n if block_n is None else block_n
    _check_block("block_m", block_m)
    _check_block("block_n", block_n)
    reason = triton_unsupported_reason(query, key, value, dropout=dropout)
    if reason is not None:
        raise TritonUnsupportedError(reason)
    batch, heads, n_q, dim = query.shape
    n_k = key.shape[-2]
    ones = torch.ones((), dtype=torch.bool, device=query.device)
    if allowed is None:
        allowed = ones.expand(batch, heads, n_q, n_k)
    elif allowed.dtype != torch.bool:
        raise ValueError(f"allowed must be a bool mask (True = attend), got {allowed.dtype}")
    query_valid_given = query_valid is not None
    if query_valid is None:
        query_valid = ones.expand(batch, heads, n_q, 1)
    elif query_valid.dtype != torch.bool or query_valid.shape[-1] != 1:
        raise ValueError(
            f"query_valid must be bool (B, 1|H, Lq, 1), got {query_valid.dtype} {tuple(query_valid.shape)}"
        )
    if bias is not None and not bias.is_floating_point():
        raise ValueError(f"bias must be a float additive bias, got {bias.dtype}")
    from .function import TritonOptions, TritonSinkhornAttention  # imports triton and decorates the kernels

    scale = 1 / math.sqrt(dim) if scale is None else float(scale)
    options = TritonOptions(scale, iterations, block_m, block_n, query_valid_given)
    return TritonSinkhornAttention.apply(query, key, value, bias, allowed, query_valid[..., 0], options)
