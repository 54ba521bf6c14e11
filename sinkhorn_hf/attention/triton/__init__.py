"""Fused Triton kernels for K-step Sinkhorn attention (forward and exact backward), memory O(N·D) + O(K·N) per head.

:func:`triton_sinkhorn_attention` is the entry point, :func:`triton_unsupported_reason` tells the router when to
fall back to PyTorch (no CUDA and no interpreter, no triton, dropout, tolerance, implicit backward, head dim...).
Importing this package does not import Triton.
"""

from .api import TritonUnsupportedError, triton_sinkhorn_attention, triton_unsupported_reason

__all__ = ["TritonUnsupportedError", "triton_sinkhorn_attention", "triton_unsupported_reason"]
