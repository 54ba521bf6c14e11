"""Self-checks of a rebuilding scheme: rebuilt layer inputs that are wrong or non-finite never pass silently.

Every backward through a stack that rebuilds inputs (euler, heun, momentum, auto) checks each rebuilt input for
inf/NaN on the device, over the whole batch, and reads the flags back once, at the bottom of the stack: one host
sync per backward of the stack. On *checked* passes (the first that builds a graph, then every ``probe_every``;
never under ``auto``, whose probe already bounds the errors) each layer also keeps a copy of its exact input for a
*slice* of the batch (``reference_rows`` sequences: the one with the smallest token, then evenly spaced ones,
:func:`check_rows`), and the
backward compares the same rows of the rebuilt input with it (error ``max_t ‖x̂_t − x_t‖ / ‖x_t‖`` of
:func:`~.probe.relative_error`, chained from the stack output as the adjoint rebuilds it). The copies cost
``reference_rows / batch`` of ``scheme="checkpoint"``'s activation memory on that pass, so the peak memory of a run
stays the adjoint's own (``reference_rows=None`` keeps the whole batch, as checkpointing does).

What the slice can miss: the error is measured on the sliced sequences only. A rebuild that is finite but wrong
only in other sequences (one unusual sequence of the batch: much longer, or with tokens whose hidden state is tiny,
which a pre-LN block amplifies) passes the check. Rebuild errors come from the layers' sensitivity, which is
mostly shared by the sequences of a batch, so the slice's worst error is an estimate of the batch's, not a bound;
non-finite values are caught in every sequence.

An error above the tolerance raises :class:`InexactAdjointError`, or, when the user opted out with
``allow_inexact=True``, warns once with the errors; a non-finite rebuilt input always raises (it makes
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


def check_rows(x: Tensor, rows: int | None) -> Tensor | None:
    """Indices of the ``rows`` sequences of the batch ``x`` (B, ..., H) that a self-check keeps exact inputs for:
    first the sequence holding the smallest token (‖x_t‖ least: relative errors divide by it, and a model that
    zeroes padded tokens makes it 0), then sequences evenly spaced from the first to the last; None when that is
    the whole batch (``rows`` None or ≥ B). One host sync."""
    batch = x.shape[0]
    if rows is None or rows >= batch:
        return None
    smallest = int(x.detach().flatten(1, -2).norm(dim=-1).amin(dim=1).argmin())
    spaced = torch.linspace(0, batch - 1, rows).round().long().tolist()
    chosen = list(dict.fromkeys([smallest, *spaced, *range(batch)]))[:rows]
    return torch.tensor(sorted(chosen))


def rows_of(x: Tensor, rows: Tensor | None) -> Tensor:
    """The ``rows`` (along dim 0) of ``x``, as a new tensor; ``x`` itself when ``rows`` is None."""
    return x if rows is None else x.index_select(0, rows.to(x.device))


class InexactAdjointError(RuntimeError):
    """The rebuilt layer inputs of an adjoint scheme are off by more than its tolerance, or are not finite."""


class RebuildGuard:
    """The self-check of one stack under a rebuilding scheme (``label``: e.g. ``"'euler' on encoder.layer"``).

    ``errors`` maps each rebuilt layer to its input's rebuild error at the last checked backward (pass
    ``checked_pass``; None before the first).
    """

    def __init__(
        self, label: str, tolerance: float, allow_inexact: bool, references: bool, reference_rows: int | None = None
    ) -> None:
        self.label, self.tolerance, self.allow_inexact, self.references = label, tolerance, allow_inexact, references
        self.reference_rows = reference_rows
        self.errors: dict[int, float] | None = None
        self.checked_pass: int | None = None
        self._warned = False

    def new_pass(self, pass_index: int, referenced: bool) -> PassCheck:
        """The check of one forward pass's backward; ``referenced``: compare with stored exact inputs."""
        return PassCheck(self, pass_index, referenced and self.references, self.reference_rows)

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

    def __init__(self, guard: RebuildGuard, pass_index: int, referenced: bool, rows: int | None = None) -> None:
        self.guard, self.pass_index, self.referenced, self.rows = guard, pass_index, referenced, rows
        self.bottom: int | None = None  # the lowest position run through the Function: the backward's last
        self._values: dict[int, Tensor] = {}
        self._rows: Tensor | None = None  # the checked sequences, chosen at the pass's first layer

    def enter(self, position: int) -> None:
        """Position ``position`` ran through the Function in the forward."""
        self.bottom = position if self.bottom is None else min(self.bottom, position)

    def reference(self, x: Tensor) -> Tensor:
        """What a layer keeps of its exact input ``x`` (B, ...) to compare with: a copy of the checked rows."""
        if self._rows is None:
            self._rows = check_rows(x, self.rows)
        return rows_of(x, self._rows)

    def record(self, position: int, rebuilt: State, reference: Tensor | None) -> None:
        """Keep, on the device, whether ``rebuilt`` is finite (every row) and the error of its checked rows against
        ``reference`` (from :meth:`reference`)."""
        finite = torch.stack([torch.isfinite(s).all() for s in rebuilt]).all().double()
        if reference is None:
            error = finite.new_tensor(0.0)
        else:
            error = relative_error_tensor(rows_of(rebuilt[0], self._rows), reference)
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
