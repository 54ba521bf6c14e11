"""The ``auto`` policy: an exact anchor at every layer whose rebuilt input would be wrong, rebuilding the rest.

On the first pass that builds a graph (and every ``probe_every`` such passes) the stack is run and reversed on
the batch (:func:`~.probe.measure_reconstruction`); walking down from the output, a layer whose rebuilt input is
off by more than ``tolerance`` (worst token's relative error) stores its exact input, and the chain restarts
there. The choice, with the activation memory it keeps, is logged and kept as an :class:`AutoChoice`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from .layer_views import Sublayer
from .probe import measure_reconstruction, saved_activation_bytes
from .rules import Rule, State

logger = logging.getLogger(__name__)
_MIB = 2**20


@dataclass
class AutoChoice:
    """What the auto policy chose at one probe, with the activation memory it keeps for backward (bytes)."""

    pass_index: int
    errors: list[float]  # reconstruction error of each layer's input, rebuilt from the nearest anchor above
    anchors: list[int]
    tolerance: float
    adjoint_bytes: int
    checkpoint_bytes: int
    plain_bytes: int

    def describe(self, name: str, n_layers: int) -> str:
        stored = len(self.anchors)
        verdict = (
            "falls back to checkpointing every layer"
            if stored == n_layers
            else "rebuilds every layer input"
            if stored == 0
            else f"rebuilds {n_layers - stored}/{n_layers} inputs"
        )
        return (
            f"adjoint auto on {name} (pass {self.pass_index}): reconstruction errors "
            f"[{', '.join(f'{e:.2g}' for e in self.errors)}] at tolerance {self.tolerance:g}; anchors at layers "
            f"{self.anchors}: {verdict}. Activation memory kept for backward ≈ {self.adjoint_bytes / _MIB:.1f} MiB "
            f"(checkpointing every layer ≈ {self.checkpoint_bytes / _MIB:.1f} MiB, plain backprop ≈ "
            f"{self.plain_bytes / _MIB:.1f} MiB)."
        )


def probe_due(choice: AutoChoice | None, passes: int, probe_every: int | None) -> bool:
    """Whether graph-building pass number ``passes`` (from 1) probes: the first, then every ``probe_every``."""
    return choice is None or (probe_every is not None and (passes - 1) % probe_every == 0)


def choose_anchors(
    name: str,
    rule: Rule,
    layers: list[list[Sublayer]],
    first_layer: nn.Module,
    x0: State,
    training: bool,
    tolerance: float,
    pass_index: int,
) -> AutoChoice:
    """Anchors for the stack ``name`` (``layers``: each layer's sublayers, ``x0``: its input state), logged."""
    found = measure_reconstruction(rule, layers, x0, training, tolerance, full=False)
    n_layers = len(layers)
    state_bytes = sum(t.nbytes for t in x0)
    plain = saved_activation_bytes(rule, layers[0], first_layer, x0, training) * n_layers
    kept = [state_bytes if n in found.anchors else found.record_bytes[n] for n in range(n_layers)]
    choice = AutoChoice(
        pass_index,
        found.decision_errors,
        found.anchors,
        tolerance,
        adjoint_bytes=sum(kept) + state_bytes,
        checkpoint_bytes=state_bytes * (n_layers + 1),
        plain_bytes=plain,
    )
    logger.info(choice.describe(name, n_layers))
    return choice
