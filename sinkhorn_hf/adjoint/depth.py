"""Depth profiles of the weights of a residual stack, to build ODE-like (or deliberately not) models.

With residual scale 1/N (``enable_adjoint(..., residual_scale="1/L")``) a stack ``x_{n+1} = x_n + f(x_n, θ_n)/N``
discretises the ODE ``ẋ = f(x, θ(t))`` when θ_n = θ(n/N) for a smooth θ; the reverse pass then converges as N
grows (Sander et al., NeurIPS 2022). ``"smooth"`` sets every weight matrix to θ(t) = A·cos(πt/2) + B·sin(πt/2)
with A, B Gaussian; ``"iid"`` draws each layer's matrices independently. Entries have standard deviation
``gain/√fan_in``, so each branch has gain about ``gain``. LayerNorm parameters and biases are left alone.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .blocks import find_stacks

PROFILES = ("smooth", "iid")


@torch.no_grad()
def set_depth_profile(model: nn.Module, profile: str, gain: float = 1.0, seed: int = 0) -> None:
    """Overwrite the weight matrices of every residual stack of ``model`` with a ``profile`` across depth."""
    if profile not in PROFILES:
        raise ValueError(f"unknown depth profile {profile!r}; choose one of {', '.join(PROFILES)}.")
    generator = torch.Generator().manual_seed(seed)
    for stack in find_stacks(model):
        layers = list({id(m): m for m in stack.positions}.values())
        depth = len(layers)
        for name, first in layers[0].named_parameters():
            if first.dim() < 2:
                continue
            std = gain / math.sqrt(first.shape[-1])

            def draw(shape=first.shape, std=std) -> torch.Tensor:
                return torch.randn(shape, generator=generator, dtype=torch.float64) * std

            a, b = draw(), draw()
            for n, layer in enumerate(layers):
                t = n / max(depth - 1, 1)
                value = a * math.cos(math.pi * t / 2) + b * math.sin(math.pi * t / 2) if profile == "smooth" else draw()
                layer.get_parameter(name).copy_(value)
