"""Sinkhorn attention: the maths (:mod:`.sinkhorn`), its fast routes (:mod:`.fast`), masks, settings and the
transformers interface."""

from .fast import sinkhorn_attention
from .interface import ATTN_IMPLEMENTATION, CausalSinkhornError, register, sinkhorn_attention_forward
from .masking import Support, support_from_mask
from .settings import SinkhornSettings
from .sinkhorn import MASKED_LOGIT, log_sinkhorn, sinkhorn, sinkhorn_potentials

__all__ = [
    "ATTN_IMPLEMENTATION",
    "MASKED_LOGIT",
    "CausalSinkhornError",
    "SinkhornSettings",
    "Support",
    "log_sinkhorn",
    "register",
    "sinkhorn",
    "sinkhorn_attention",
    "sinkhorn_attention_forward",
    "sinkhorn_potentials",
    "support_from_mask",
]
