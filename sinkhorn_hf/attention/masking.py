"""Turn whatever mask a transformers model hands to an attention function into a Sinkhorn support.

What arrives (transformers 5.x): ``None`` (nothing padded), a bool (B, 1|H, Lq, Lk) mask with True = attend
(``sdpa_mask``, or a user's own 4D mask), or a float (B, 1|H, Lq, Lk) additive bias (BEiT's relative
positions, Swin's window bias, eager-style masks) where the dtype minimum means masked.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Support(NamedTuple):
    """allowed (B, 1|H, Lq, Lk) bool; bias broadcastable to the scores, or None; query_valid (B, 1|H, Lq, 1)."""

    allowed: Tensor
    bias: Tensor | None
    query_valid: Tensor


def support_from_mask(attention_mask: Tensor | None, q_len: int, k_len: int, device: torch.device) -> Support:
    """Split ``attention_mask`` into the entries that may carry mass, an additive bias, and valid queries.

    Encoder masks mark padded keys only; in self-attention (Lq == Lk) a query is padding exactly when the
    key at its position is never attended to, so such rows are left out of the column marginals.
    """
    if attention_mask is None:
        allowed = torch.ones((1, 1, q_len, k_len), dtype=torch.bool, device=device)
        return Support(allowed, None, torch.ones((1, 1, q_len, 1), dtype=torch.bool, device=device))
    if attention_mask.dim() != 4:
        raise ValueError(
            "sinkhorn attention expects a 4D attention mask (batch, heads or 1, query_len, key_len), got shape "
            f"{tuple(attention_mask.shape)}"
        )
    if attention_mask.dtype == torch.bool:
        allowed, bias = attention_mask, None
    elif attention_mask.is_floating_point():
        # Half of the dtype minimum: transformers writes finfo.min, adding a bias to it may round upward.
        allowed = attention_mask > torch.finfo(attention_mask.dtype).min / 2
        bias = torch.where(allowed, attention_mask, 0).float()
    else:
        raise ValueError(
            f"sinkhorn attention mask must be bool (True = attend) or a float additive bias, got {attention_mask.dtype}"
        )
    if q_len == k_len:
        query_valid = allowed.any(dim=-2).unsqueeze(-1)
    else:
        query_valid = torch.ones(allowed.shape[:-1] + (1,), dtype=torch.bool, device=device)
    return Support(allowed, bias, query_valid)
