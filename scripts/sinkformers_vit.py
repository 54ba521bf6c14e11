"""The attention-only ViT of the Sinkformers MNIST experiment (Sander et al., AISTATS 2022, Sec. 5), built on
the public ``sinkhorn_hf.attention.sinkhorn_attention``.

Architecture of the authors' ``ViT_only_Att`` (their ``vit-pytorch/vit_pytorch/vit.py``): patches → Linear(p²·C,
hidden) + CLS token + learned positions (both N(0, 1) at init), then ``depth`` pre-norm attention blocks with a
residual and NO feed-forward block (x ← x + W_o Sinkhorn_K(q kᵀ / √d) v, q, k, v = W_{q,k,v} LN(x), no bias), then
LN + Linear on the CLS token. Their attention has 1 head of dim 64 inside a hidden size of 128 (inner dim 64 ≠
hidden), which transformers' ``ViTSelfAttention`` cannot express (its head dim is hidden / heads), hence this small
module rather than ``ViTForImageClassification(attn_implementation="sinkhorn")``. K = 1 is SoftMax; the authors'
Sinkhorn (ε = 1, rows first, plan rescaled by n) is the library's: rows sum to 1, columns to n_q / n_k = 1.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sinkhorn_hf import SinkhornSettings
from sinkhorn_hf.attention import sinkhorn_attention


class SinkhornSelfAttention(nn.Module):
    """x (B, N, hidden) → W_o Sinkhorn_K(q kᵀ / √d) v, (B, N, hidden); q, k, v (B, heads, N, head_dim)."""

    def __init__(self, hidden_size: int, heads: int, head_dim: int, iterations: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.settings = SinkhornSettings(iterations=iterations)
        self.to_qkv = nn.Linear(hidden_size, 3 * heads * head_dim, bias=False)
        self.to_out = nn.Linear(heads * head_dim, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, _ = x.shape
        qkv = self.to_qkv(x).view(batch, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out, _ = sinkhorn_attention(qkv[0], qkv[1], qkv[2], scale=self.head_dim**-0.5, settings=self.settings)
        return self.to_out(out.transpose(1, 2).reshape(batch, tokens, self.heads * self.head_dim))


class AttentionBlock(nn.Module):
    """Pre-norm residual attention, no feed-forward: x ← x + Attn(LN(x)); x (B, N, hidden)."""

    def __init__(self, hidden_size: int, heads: int, head_dim: int, iterations: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.attention = SinkhornSelfAttention(hidden_size, heads, head_dim, iterations)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.attention(self.norm(x))


class AttentionOnlyViT(nn.Module):
    """images (B, C, H, W) → logits (B, num_classes); (H/p)·(W/p) patch tokens plus a CLS token."""

    def __init__(
        self,
        patch_size: int,
        iterations: int,
        image_size: int = 28,
        channels: int = 1,
        num_classes: int = 10,
        hidden_size: int = 128,
        heads: int = 1,
        head_dim: int = 64,
        depth: int = 1,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"patch size {patch_size} must divide the image size {image_size}")
        tokens = (image_size // patch_size) ** 2 + 1
        # a stride-p convolution with a p×p kernel is the authors' Linear on flattened patches (same default init)
        self.patches = nn.Conv2d(channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden_size))
        self.positions = nn.Parameter(torch.randn(1, tokens, hidden_size))
        self.blocks = nn.Sequential(*(AttentionBlock(hidden_size, heads, head_dim, iterations) for _ in range(depth)))
        self.head = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, num_classes))

    def forward(self, images: Tensor) -> Tensor:
        x = self.patches(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.positions
        return self.head(self.blocks(x)[:, 0])
