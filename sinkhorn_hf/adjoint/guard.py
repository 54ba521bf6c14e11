"""Self-checks of a rebuilding scheme: rebuilt layer inputs that are wrong or non-finite never pass silently.

Every backward through a stack that rebuilds inputs (euler, heun, momentum, auto) checks each rebuilt input for
inf/NaN on the device and reads the flags back once, at the bottom of the stack: one host sync per backward of
the stack. On *checked* passes (the first that builds a graph, then every ``probe_every``; never under ``auto``,
whose probe already bounds the errors) each layer also keeps its exact input as a reference, which costs the
memory of ``scheme="checkpoint"`` for that pass only, and the backward compares the rebuilt input with it
(error ``max_t ‖x̂_t − x_t‖ / ‖x_t‖`` of :func:`~.probe.relative_error`, chained from the stack output as the
adjoint rebuilds it). An error above the tolerance raises :class:`InexactAdjointError`, or, when the user opted
out with ``allow_inexact=True``, warns once with the errors; a non-finite rebuilt input always raises (it makes
non-finite gradients).
"""

from __future__ import annotations

import warnings

import torch

from .probe import relative_error_tensor
from .rules import State

Tensor = torch.Tensor
_REMEDY = (
    "Use scheme='auto' (stores the exact input of every layer whose rebuild is off) or scheme='checkpoint' "
    "(exact recomputation, nothing rebuilt)"
)


class InexactAdjointError(RuntimeError):
    """The rebuilt layer inputs of an adjoint scheme are off by more than its tolerance, or are not finite."""


class RebuildGuard:
    """The self-check of one stack under a rebuilding scheme (``label``: e.g. ``"'euler' on encoder.layer"``).

    ``errors`` maps each rebuilt layer to its input's rebuild error at the last checked backward (pass
    ``checked_pass``; None before the first).
    """

    def __init__(self, label: str, tolerance: float, allow_inexact: bool, references: bool) -> None:
        self.label, self.tolerance, self.allow_inexact, self.references = label, tolerance, allow_inexact, references
        self.errors: dict[int, float] | None = None
        self.checked_pass: int | None = None
        self._warned = False

    def new_pass(self, pass_index: int, referenced: bool) -> PassCheck:
        """The check of one forward pass's backward; ``referenced``: compare with stored exact inputs."""
        return PassCheck(self, pass_index, referenced and self.references)

    def judge(self, pass_index: int, positions: list[int], finite: list[bool], errors: list[float] | None) -> None:
        """Raise (or warn once, under ``allow_inexact``) when a rebuilt input is non-finite or too far off."""
        nonfinite = [p for p, ok in zip(positions, finite, strict=True) if not ok]
        if nonfinite:
            shown = "" if errors is None else f" (rebuild errors: {_listing(positions, errors)})"
            raise InexactAdjointError(
                f"adjoint {self.label}: the rebuilt inputs of layers {nonfinite} are not finite (inf/NaN), starting "
                f"at layer {max(nonfinite)} (inputs are rebuilt top-down){shown}; the gradients would be non-finite "
                f"(allow_inexact does not cover this). {_REMEDY}."
            )
        if errors is None:
            return
        self.errors, self.checked_pass = dict(zip(positions, errors, strict=True)), pass_index
        over = [p for p, e in zip(positions, errors, strict=True) if not e <= self.tolerance]
        if not over:
            return
        message = (
            f"adjoint {self.label}: the rebuilt inputs of layers {over} are off by more than {self.tolerance:g}, "
            f"the tolerance (worst token's relative error; {_listing(positions, errors)}), so the gradients "
            "through them are wrong."
        )
        if not self.allow_inexact:
            raise InexactAdjointError(
                f"{message} {_REMEDY}, or pass allow_inexact=True to enable_adjoint to train with them anyway."
            )
        if not self._warned:
            self._warned = True
            warnings.warn(f"{message} Training on (allow_inexact=True). {_REMEDY}.", RuntimeWarning, stacklevel=2)


class PassCheck:
    """What the backward of one forward pass checks: per rebuilt position, finiteness and (if referenced) error."""

    def __init__(self, guard: RebuildGuard, pass_index: int, referenced: bool) -> None:
        self.guard, self.pass_index, self.referenced = guard, pass_index, referenced
        self.bottom: int | None = None  # the lowest position run through the Function: the backward's last
        self._values: dict[int, Tensor] = {}

    def enter(self, position: int) -> None:
        """Position ``position`` ran through the Function in the forward."""
        self.bottom = position if self.bottom is None else min(self.bottom, position)

    def record(self, position: int, rebuilt: State, reference: Tensor | None) -> None:
        """Keep, on the device, whether ``rebuilt`` is finite and its error against ``reference``."""
        finite = torch.stack([torch.isfinite(s).all() for s in rebuilt]).all().double()
        error = relative_error_tensor(rebuilt[0], reference) if reference is not None else finite.new_tensor(0.0)
        self._values[position] = torch.stack([finite, error])

    def finish(self, position: int) -> None:
        """At the stack's bottom layer: read every flag back (the one host sync) and let the guard judge."""
        if position != self.bottom or not self._values:
            return
        positions = sorted(self._values)
        values = torch.stack([self._values.pop(p) for p in positions]).tolist()
        errors = [e for _, e in values] if self.referenced else None
        self.guard.judge(self.pass_index, positions, [f == 1.0 for f, _ in values], errors)


def _listing(positions: tuple[int, ...] | list[int], errors: tuple[float, ...] | list[float]) -> str:
    return ", ".join(f"layer {p}: {e:.2g}" for p, e in zip(positions, errors, strict=True))
