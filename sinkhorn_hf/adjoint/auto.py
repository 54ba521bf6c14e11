"""The ``auto`` policy: an exact anchor at every layer whose rebuilt input would be wrong, rebuilding the rest.

On the first pass that builds a graph (and every ``probe_every`` such passes) the stack is run and reversed on
a slice of the batch (the self-check's ``reference_rows`` sequences, :func:`~.guard.check_rows`;
:func:`~.probe.measure_reconstruction`); walking down from the output, a layer whose rebuilt input is
off by more than ``tolerance`` (worst token's relative error) stores its exact input, and the chain restarts
there. The choice, with the activation memory it keeps, is logged and kept as an :class:`AutoChoice`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from .layer_views import Sublayer
from .probe import measure_reconstruction, saved_activation_bytes
from .rules import Rule, State

logger = logging.getLogger(__name__)
_MIB = 2**20


@dataclass(repr=False)
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

    def __repr__(self) -> str:
        errors = ", ".join(f"{e:.2g}" for e in self.errors)
        return (
            f"AutoChoice(pass {self.pass_index}: anchors={self.anchors}, errors=[{errors}], tolerance="
            f"{self.tolerance:g}, kept {self.adjoint_bytes / _MIB:.1f} MiB, checkpoint "
            f"{self.checkpoint_bytes / _MIB:.1f} MiB, plain {self.plain_bytes / _MIB:.1f} MiB)"
        )

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-serialisable values (a non-finite error becomes None)."""
        return {**dataclasses.asdict(self), "errors": [e if math.isfinite(e) else None for e in self.errors]}

    @classmethod
    def from_dict(cls, state: Any, n_layers: int, where: str) -> AutoChoice:
        """The inverse of :meth:`to_dict` (None errors read as inf), checked against a stack of ``n_layers``."""
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(state, Mapping) or sorted(state) != sorted(names):
            raise ValueError(f"{where}: a choice has the fields {names}, got {state!r}.")
        anchors, errors = state["anchors"], state["errors"]
        valid = isinstance(anchors, list) and all(isinstance(a, int) and 0 <= a < n_layers for a in anchors)
        if not valid or not isinstance(errors, list) or len(errors) != n_layers:
            raise ValueError(
                f"{where}: the choice does not fit a stack of {n_layers} layers (anchors {anchors!r}, "
                f"{len(errors) if isinstance(errors, list) else errors!r} errors)."
            )
        errors = [math.inf if e is None else float(e) for e in errors]
        return cls(**{**state, "errors": errors, "anchors": sorted(anchors)})


def probe_due(probed_before: bool, passes: int, probe_every: int | None) -> bool:
    """Whether graph-building pass number ``passes`` (from 1) probes: the first (until one probe is done), then
    every ``probe_every``."""
    return not probed_before or (probe_every is not None and (passes - 1) % probe_every == 0)


def choose_anchors(
    name: str,
    rule: Rule,
    layers: list[list[Sublayer]],
    first_layer: nn.Module,
    x0: State,
    training: bool,
    tolerance: float,
    pass_index: int,
    batch_share: float = 1.0,
) -> AutoChoice:
    """Anchors for the stack ``name`` (``layers``: each layer's sublayers, ``x0``: its input state), logged.

    ``x0`` may be a slice of the batch (the probe keeps every layer's state: on the whole batch that would be
    checkpointing's memory); ``batch_share`` (batch size / slice size) scales the memory figures to the batch.
    """
    found = measure_reconstruction(rule, layers, x0, training, tolerance, full=False)
    n_layers = len(layers)
    state_bytes = round(sum(t.nbytes for t in x0) * batch_share)
    plain = round(saved_activation_bytes(rule, layers[0], first_layer, x0, training) * batch_share) * n_layers
    kept = [state_bytes if n in found.anchors else round(found.record_bytes[n] * batch_share) for n in range(n_layers)]
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
