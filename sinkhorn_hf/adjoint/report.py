"""``probe_adjoint``: how faithful the adjoint is on one batch, against exact backprop."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .controller import DEFAULT_TOLERANCE, adjoint_stacks, disable_adjoint, enable_adjoint
from .probe import Reconstruction


@dataclass
class AdjointProbe:
    """Fidelity of one model's adjoint on one batch.

    ``stacks`` maps each stack (e.g. ``"bert.encoder.layer"``) to its reconstruction errors (see
    :class:`~.probe.Reconstruction`). ``grad_cosine`` and ``grad_rel_error`` compare the gradients of all
    trainable parameters under the model's scheme (with the anchors auto chose, if auto) with exact backprop of
    the same forward and the same dropout masks: cos = ⟨g, g*⟩/(‖g‖‖g*‖), rel = ‖g − g*‖/‖g*‖.
    """

    scheme: str
    stacks: dict[str, Reconstruction]
    grad_cosine: float
    grad_rel_error: float

    @property
    def step_errors(self) -> list[float]:
        return next(iter(self.stacks.values())).step_errors

    @property
    def chained_errors(self) -> list[float]:
        return next(iter(self.stacks.values())).chained_errors

    @property
    def anchors(self) -> list[int]:
        return next(iter(self.stacks.values())).anchors


def scalar_loss(output: Any) -> torch.Tensor:
    """The model's loss if it returned one, else a fixed random projection of its first output."""
    loss = getattr(output, "loss", None)
    if loss is not None:
        return loss
    first = output[0] if not isinstance(output, torch.Tensor) else output
    weights = torch.randn(first.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    return (first.float() * weights.to(first.device)).sum()


def _grads(model: nn.Module, batch: Mapping[str, Any], params: list[nn.Parameter]) -> list[torch.Tensor]:
    loss = scalar_loss(model(**batch))
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def probe_adjoint(
    model: nn.Module, batch: Mapping[str, Any], *, scheme: str | None = None, tolerance: float | None = None
) -> AdjointProbe:
    """Reconstruction errors per layer and gradient agreement with exact backprop, on ``batch``.

    Uses the scheme the model is under (``scheme`` overrides it for this probe; a model without the adjoint is
    probed under ``"euler"``). The model's train/eval mode is respected: in train mode both gradient runs
    see the same dropout masks. Parameter ``.grad`` fields are not touched; the global RNG is left as it was.
    Costs three forward and two backward passes.
    """
    previous = adjoint_stacks(model)
    restore = dict(previous[0].settings) if previous else None
    chosen_scheme = scheme or (restore["scheme"] if restore else "euler")
    chosen_tolerance = tolerance if tolerance is not None else (restore["tolerance"] if restore else DEFAULT_TOLERANCE)
    if chosen_scheme == "off":
        raise ValueError("probe_adjoint needs an adjoint scheme; the model's scheme is 'off'.")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("probe_adjoint needs trainable parameters; all of the model's are frozen.")
    temporary = scheme is not None or tolerance is not None or not previous
    if temporary:
        enable_adjoint(model, chosen_scheme, chosen_tolerance)
    stacks = adjoint_stacks(model)
    try:
        with torch.random.fork_rng(devices=_devices(params)):
            rng = torch.get_rng_state(), _accel_states(params)
            for stack in stacks:
                stack.request_probe()
            with torch.no_grad():
                model(**batch)
            _set_rng(rng, params)
            with ExitStack() as exact_mode:
                for stack in stacks:
                    exact_mode.enter_context(stack.storing_every_input())
                exact = _grads(model, batch, params)
            _set_rng(rng, params)
            adjoint = _grads(model, batch, params)
    finally:
        if temporary:
            disable_adjoint(model)
            if restore is not None:
                enable_adjoint(model, restore.pop("scheme"), **restore)
    g = torch.cat([t.detach().double().flatten() for t in adjoint])
    g_exact = torch.cat([t.detach().double().flatten() for t in exact])
    cosine = float(g @ g_exact / (g.norm() * g_exact.norm()).clamp_min(1e-300))
    rel = float((g - g_exact).norm() / g_exact.norm().clamp_min(1e-300))
    return AdjointProbe(chosen_scheme, {s.stack.name: s.reconstruction for s in stacks}, cosine, rel)


def _devices(params: list[nn.Parameter]) -> list[torch.device]:
    return sorted({p.device for p in params if p.device.type == "cuda"}, key=str)


def _accel_states(params: list[nn.Parameter]) -> list[tuple[torch.device, torch.Tensor]]:
    return [(d, torch.cuda.get_rng_state(d)) for d in _devices(params)]


def _set_rng(rng: tuple, params: list[nn.Parameter]) -> None:
    torch.set_rng_state(rng[0])
    for device, state in rng[1]:
        torch.cuda.set_rng_state(state, device)
