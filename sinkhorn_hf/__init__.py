"""sinkhorn_hf: Sinkformers (doubly stochastic attention) for Hugging Face transformers.

``import sinkhorn_hf`` registers ``attn_implementation="sinkhorn"``.
"""

from .adjoint import disable_adjoint, enable_adjoint, probe_adjoint
from .attention import (
    ATTN_IMPLEMENTATION,
    CausalSinkhornError,
    SinkhornSettings,
    log_sinkhorn,
    register,
    sinkhorn,
    sinkhorn_attention_forward,
)
from .families import SUPPORTED_FAMILIES, UnsupportedModelError

register()

__version__ = "0.1.0"

__all__ = [
    "ATTN_IMPLEMENTATION",
    "SUPPORTED_FAMILIES",
    "CausalSinkhornError",
    "SinkhornSettings",
    "UnsupportedModelError",
    "disable_adjoint",
    "enable_adjoint",
    "log_sinkhorn",
    "probe_adjoint",
    "sinkhorn",
    "sinkhorn_attention_forward",
]
