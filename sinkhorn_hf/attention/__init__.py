"""Sinkhorn attention: the reference maths (:mod:`.sinkhorn`), the half-steps every route shares
(:mod:`.iterations`), score geometry (:mod:`.scores`), the dense and streaming routes and the choice between them
(:mod:`.routes`), masks, settings and the transformers interface."""

from .interface import ATTN_IMPLEMENTATION, CausalSinkhornError, register, sinkhorn_attention_forward
from .masking import Support, support_from_mask
from .routes import sinkhorn_attention
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
