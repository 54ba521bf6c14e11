"""Fidelity of the adjoint: rebuild errors per layer, and gradient agreement with exact backprop.

Errors are the worst token's relative error ``max_t ‖x̂_{n,t} − x_{n,t}‖ / ‖x_{n,t}‖``, where x_n is the
exact input of layer n from a forward pass. The *step* error rebuilds x_n from the exact x_{n+1} (one reverse step);
the *chained* error rebuilds it from the stack output through all layers above, as the adjoint does. The greedy
anchors walk down the stack and store the input of every layer whose chained error would exceed the tolerance,
restarting the chain from that exact value (what the ``auto`` policy keeps).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .layer_views import Sublayer
from .record import LayerRecord
from .rng import forked_rng
from .rules import Rule, State

if TYPE_CHECKING:
    from .attach import AdjointStack

Tensor = torch.Tensor


def relative_error_tensor(estimate: Tensor, exact: Tensor) -> Tensor:
    """:func:`relative_error` as a 0-dim float64 tensor on the inputs' device (no host sync); NaN if any is."""
    exact64 = exact.detach().double()
    error = (estimate.detach().double() - exact64).norm(dim=-1)
    return (error / exact64.norm(dim=-1).clamp_min(1e-300)).max()


def relative_error(estimate: Tensor, exact: Tensor) -> float:
    """The worst token's relative error, max_t ‖x̂_t − x_t‖ / ‖x_t‖ over all (batch, position) vectors.

    Per token, not over the whole tensor: a pre-LN block amplifies errors by 1/‖x_t‖, so one small token
    (a CLS token initialised near zero) can carry a wrong gradient that a global ratio would hide.
    """
    return float(relative_error_tensor(estimate, exact))


@dataclass
class Reconstruction:
    """Per layer n (input of layer n): step errors, chained errors without anchors, greedy anchors."""

    step_errors: list[float]
    chained_errors: list[float]
    anchors: list[int]
    decision_errors: list[float]  # chained errors with the anchors above each layer (what auto compares)
    record_bytes: list[int]  # what each reversible layer call keeps (LayerNorm statistics, RNG states)


@torch.no_grad()
def measure_reconstruction(
    rule: Rule, layers: list[list[Sublayer]], x0: State, training: bool, tolerance: float, full: bool = True
) -> Reconstruction:
    """Run the stack (``layers``: each layer's sublayers) forward from ``x0`` keeping every state, then reverse it.

    ``full=False`` skips the step and anchor-free chained errors (the auto policy needs only the anchors).
    Random layers replay their own forward masks, so the measurement holds for this batch and these masks.
    """
    states, records = [x0], []
    with forked_rng([x0[0].device]):
        for sublayers in layers:
            rec = rule.new_record(x0[0], training)
            states.append(rule.run(sublayers, states[-1], rec))
            records.append(rec)
        n_layers = len(layers)

        def rebuild(n: int, out: State) -> State:
            return rule.reverse(layers[n], out, records[n])

        anchored, anchors, current = [0.0] * n_layers, [], states[-1]
        for n in reversed(range(n_layers)):
            rebuilt = rebuild(n, current)
            anchored[n] = relative_error(rebuilt[0], states[n][0])
            if not anchored[n] <= tolerance:  # NaN (a non-finite rebuild) is over any tolerance
                anchors.append(n)
                current = states[n]
            else:
                current = rebuilt
        step_errors, chained = [], []
        if full:
            step_errors = [relative_error(rebuild(n, states[n + 1])[0], states[n][0]) for n in range(n_layers)]
            chained, current = [0.0] * n_layers, states[-1]
            for n in reversed(range(n_layers)):
                current = rebuild(n, current)
                chained[n] = relative_error(current[0], states[n][0])
    return Reconstruction(step_errors, chained, sorted(anchors), anchored, [r.nbytes for r in records])


def saved_activation_bytes(
    rule: Rule, sublayers: list[Sublayer], layer: nn.Module, state: State, training: bool
) -> int:
    """Bytes plain backprop keeps for one call of ``layer`` (saved tensors other than its parameters)."""
    seen: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with forked_rng([state[0].device]), torch.enable_grad():
        inputs = tuple(s.detach().requires_grad_() for s in state)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            rule.run(sublayers, inputs, LayerRecord.new(state[0], training, norm_stats=False))  # as plain backprop
    return sum(seen.values())


@dataclass
class AdjointProbe:
    """Fidelity of one model's adjoint on one batch.

    ``stacks`` maps each stack (e.g. ``"bert.encoder.layer"``) to its reconstruction errors (see
    :class:`Reconstruction`). ``grad_cosine`` and ``grad_rel_error`` compare the gradients of all trainable
    parameters under the model's scheme (with the anchors auto chose, if auto) with exact backprop of the same
    forward and the same dropout masks: cos = ⟨g, g*⟩/(‖g‖‖g*‖), rel = ‖g − g*‖/‖g*‖, over the entries where both
    are finite (None when there are none, or the value overflows: never NaN). ``finite`` says whether every
    adjoint gradient entry is finite; ``nonfinite_fraction`` is the fraction that is inf/NaN.
    """

    scheme: str
    stacks: dict[str, Reconstruction]
    grad_cosine: float | None
    grad_rel_error: float | None
    finite: bool
    nonfinite_fraction: float

    @property
    def step_errors(self) -> list[float]:
        return next(iter(self.stacks.values())).step_errors

    @property
    def chained_errors(self) -> list[float]:
        return next(iter(self.stacks.values())).chained_errors

    @property
    def anchors(self) -> list[int]:
        return next(iter(self.stacks.values())).anchors


def scalar_loss(output: Any) -> Tensor:
    """The model's loss if it returned one, else a fixed random projection of its first output."""
    loss = getattr(output, "loss", None)
    if loss is not None:
        return loss
    first = output[0] if not isinstance(output, torch.Tensor) else output
    weights = torch.randn(first.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    return (first.float() * weights.to(first.device)).sum()


def _grads(model: Callable[..., Any], batch: Mapping[str, Any], params: list[nn.Parameter]) -> list[Tensor]:
    loss = scalar_loss(model(**batch))
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def compare_with_backprop(
    model: nn.Module, batch: Mapping[str, Any], stacks: list[AdjointStack], scheme: str
) -> AdjointProbe:
    """Probe ``stacks`` (attached to ``model``) on ``batch``: rebuild errors, then the gradients of the trainable
    parameters by the adjoint and by exact backprop of the same forward from the same RNG state (same masks).

    Parameter ``.grad`` fields are not touched; the global RNG is left as it was. Three forwards, two backwards.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    with forked_rng({p.device for p in params}) as start:
        for stack in stacks:
            stack.request_probe()
        with torch.no_grad():
            model(**batch)
        start.restore()
        with ExitStack() as exact_mode:
            for stack in stacks:
                exact_mode.enter_context(stack.storing_every_input())
            exact = _grads(model, batch, params)
        start.restore()
        with ExitStack() as measuring:  # the probe reports what the guard would refuse
            for stack in stacks:
                measuring.enter_context(stack.unguarded())
            adjoint = _grads(model, batch, params)
    g = torch.cat([t.detach().double().flatten() for t in adjoint])
    g_exact = torch.cat([t.detach().double().flatten() for t in exact])
    finite = torch.isfinite(g)
    usable = finite & torch.isfinite(g_exact)
    cosine, rel = _agreement(g[usable], g_exact[usable]) if bool(usable.any()) else (None, None)
    nonfinite = 1.0 - float(finite.double().mean())
    reconstructions = {s.stack.name: s.reconstruction for s in stacks}
    return AdjointProbe(scheme, reconstructions, cosine, rel, finite=nonfinite == 0.0, nonfinite_fraction=nonfinite)


def _agreement(g: Tensor, g_exact: Tensor) -> tuple[float | None, float | None]:
    """(cos(g, g*), ‖g − g*‖/‖g*‖) of two finite gradient vectors; None for a value that overflows."""
    cosine = float(g @ g_exact / (g.norm() * g_exact.norm()).clamp_min(1e-300))
    rel = float((g - g_exact).norm() / g_exact.norm().clamp_min(1e-300))
    return tuple(v if math.isfinite(v) else None for v in (cosine, rel))
