"""Which route a Sinkhorn attention call takes; they all compute the same thing.

- ``settings.backend`` first: the fused Triton kernels (:mod:`.triton`) with "triton", or with "auto" on CUDA
  where they support the call; otherwise one of the PyTorch routes below.
- K = 1 is SoftMax: plain ``scaled_dot_product_attention``.
- Dense (below the streaming threshold, or when the weights are asked for): one autograd Function that computes
  the scores once, in the kernel domain where its scalings fit the dtype (else the log domain), with its own
  backward (:mod:`.dense`, :mod:`.kernel`).
- Streaming (long sequences): never an N×N matrix; blocks of E in the kernel domain where they cover the call
  (:mod:`.kernel_streaming`), else score blocks with an online logsumexp for the K steps and a fused SDPA call
  with the last column potential as a key bias for the final pass (:mod:`.streaming`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .dense import dense_attention
from .settings import ImplicitSolver, RouteOptions, SinkhornSettings
from .streaming import sdpa_mask, streaming_attention
from .triton import TritonUnsupportedError, triton_sinkhorn_attention, triton_unsupported_reason

MIN_BLOCK_ROWS = 16  # below this, per-block overhead dominates


def block_size_for(settings: SinkhornSettings, n_q: int, n_k: int, head_dim: int) -> int | None:
    """Queries per score block: None (dense) unless streaming is on, or "auto" and max(n_q, n_k) reaches
    ``settings.streaming_threshold``; then ``settings.block_size``, or as many rows as keep a block of scores
    (rows·n_k) within half the size of Q (n_q·head_dim), so that extra memory stays O(N·D) per head."""
    stream = settings.streaming is True or (
        settings.streaming == "auto" and max(n_q, n_k) >= settings.streaming_threshold
    )
    if not stream:
        return None
    if settings.block_size is not None:
        return settings.block_size
    return max(MIN_BLOCK_ROWS, n_q * head_dim // (2 * n_k))


def uses_triton(
    settings: SinkhornSettings, query: Tensor, key: Tensor, value: Tensor, dropout: float, return_weights: bool
) -> bool:
    """Whether ``settings.backend`` sends this call to the Triton kernels: "torch" never; "auto" on CUDA when
    they support it (on CPU Triton only has its interpreter, which is for tests); "triton" always, raising
    :class:`TritonUnsupportedError` with the reason when they cannot run it."""
    if settings.backend == "torch" or (settings.backend == "auto" and not query.is_cuda):
        return False
    reason = "the Triton kernels do not return the attention weights" if return_weights else None
    reason = reason or triton_unsupported_reason(
        query, key, value, dropout=dropout, tolerance=settings.tolerance, backward=settings.backward
    )
    if reason is not None and settings.backend == "triton":
        raise TritonUnsupportedError(
            f"sinkhorn_backend='triton' cannot run this call: {reason} (sinkhorn_backend 'auto' or 'torch' use the "
            "PyTorch routes)"
        )
    return reason is None


def sinkhorn_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    allowed: Tensor | None = None,
    bias: Tensor | None = None,
    query_valid: Tensor | None = None,
    scale: float | None = None,
    settings: SinkhornSettings | None = None,
    dropout: float = 0.0,
    return_weights: bool = False,
    solver: ImplicitSolver | None = None,
) -> tuple[Tensor, Tensor | None]:
    """out = Sinkhorn_K(scale·QKᵀ + bias) V, in float32 (float64 stays float64), cast back to value's dtype.

    query (..., Lq, D), key (..., Lk, D), value (..., Lk, Dv); ``allowed`` bool broadcastable to (..., Lq, Lk)
    or None (everything), ``bias`` float broadcastable likewise or None, ``query_valid`` bool (..., Lq, 1) or
    None (every query; invalid ones are left out of the column marginals). ``dropout`` is applied to the
    attention weights (pass 0 in eval). Returns the output (..., Lq, Dv) and, if ``return_weights``, the
    weights (..., Lq, Lk) in the compute dtype (this path materialises them).
    """
    settings = settings or SinkhornSettings()
    if query.shape[:-2] != key.shape[:-2] or key.shape[:-1] != value.shape[:-1]:
        raise ValueError(
            "sinkhorn attention expects query (..., Lq, D), key (..., Lk, D) and value (..., Lk, Dv) with the same "
            f"leading dims, got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    with torch.autocast(query.device.type, enabled=False):  # autocast would run the matmuls in half precision
        return _attention(
            query, key, value, allowed, bias, query_valid, scale, settings, dropout, return_weights, solver
        )


def _attention(query, key, value, allowed, bias, query_valid, scale, settings, dropout, return_weights, solver):
    """sinkhorn_attention after validation, with autocast off."""
    if uses_triton(settings, query, key, value, dropout, return_weights):  # in the inputs' dtype, float32 inside
        output = triton_sinkhorn_attention(
            query, key, value, iterations=settings.iterations, allowed=allowed, bias=bias, query_valid=query_valid,
            scale=scale,
        )  # fmt: skip
        return output, None
    compute = torch.promote_types(query.dtype, torch.float32)  # half precision would lose the marginals
    q, k, v = query.to(compute), key.to(compute), value.to(compute)
    bias = None if bias is None else bias.to(compute)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    n_q, n_k = q.shape[-2], k.shape[-2]
    if settings.iterations == 1 and not return_weights:  # SoftMax
        output = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=sdpa_mask(allowed, bias), dropout_p=dropout, scale=scale
        )
        if allowed is not None:  # a query with no allowed key gets zeros, as in the reference
            output = output.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)
        return output.to(value.dtype), None
    block_size = None if return_weights else block_size_for(settings, n_q, n_k, q.shape[-1])
    options = RouteOptions(settings, scale, block_size, dropout, return_weights, solver or ImplicitSolver())
    if block_size is None:
        output, weights = dense_attention(q, k, v, bias, allowed, query_valid, options)
        return output.to(value.dtype), weights
    output = streaming_attention(q, k, v, bias, allowed, query_valid, options)
    return output.to(value.dtype), None
