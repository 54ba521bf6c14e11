"""Forward rules of a residual layer and their reverse: how a layer is run, how its input is rebuilt, what it keeps.

Per sublayer ``x -> N(x + f(x))`` with ``f = s·b`` (see :mod:`.layer_views`; no ``N`` for pre-LN):

- :class:`Euler`: ``z = x + f(x)`` (the pretrained model's own forward). Reverse: ``x ≈ z − f(z)``.
- :class:`Heun`: ``z = x + ½[f(x) + f(x + f(x))]`` (changes the function). Reverse:
  ``x ≈ z − ½[f(z) + f(z − f(z))]``, second order when f is smooth in depth (Sander et al., NeurIPS 2022).
- :class:`Momentum`: on the whole layer ``F(x) = layer(x) − x`` with a velocity ``v`` (Sander et al., ICML 2021):
  ``v' = γv + (1−γ)F(x)``, ``x' = x + v'``. Exactly invertible: ``x = x' − v'``, ``v = (v' − (1−γ)F(x))/γ``.
- :class:`Reversible`: a two-stream coupling on the whole layer ``L`` (MEFT, Liao et al., NeurIPS 2023, with the
  layer as F and no G): state (x, p), ``x' = L(x) + λp``, ``p' = x``, p = 0 at the bottom. Invertible exactly up to
  rounding: ``x = p'``, ``p = (x' − L(x))/λ``; λ → 0 tends to the pretrained function, λ = 1 rebuilds best.
- :class:`Checkpoint`: Euler's forward, every layer input stored (exact recomputation, nothing rebuilt).

For post-LN sublayers the reverse first undoes ``N`` with the statistics kept in the forward:
``z = (y − β)/γ_N · σ + μ`` (μ, σ: two floats per token). Randomness (dropout, drop-path) is replayed by the
:class:`~.record.LayerRecord`, so masks match exactly.
"""

from __future__ import annotations

import torch

from ..compat import outputs_not_captured
from .layer_views import Sublayer
from .record import LayerRecord

Tensor = torch.Tensor
State = tuple[Tensor, ...]  # (x,), or (x, v) for momentum


def _wide(t: Tensor) -> Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _norm_stats(z: Tensor, norm: torch.nn.LayerNorm) -> tuple[Tensor, Tensor]:
    var, mean = torch.var_mean(_wide(z), dim=-1, unbiased=False, keepdim=True)
    return mean, torch.sqrt(var + norm.eps)


def _unnorm(y: Tensor, stats: tuple[Tensor, Tensor], norm: torch.nn.LayerNorm) -> Tensor:
    mean, std = stats
    z = _wide(y)
    if norm.bias is not None:
        z = z - norm.bias.to(z.dtype)
    if norm.weight is not None:
        z = z / norm.weight.to(z.dtype)
    return (z * std + mean).to(y.dtype)


class Rule:
    """A forward rule on a layer's residual sublayers with residual scale ``scale``, and its reverse.

    Subclasses give one sublayer's residual update (:meth:`_residual`) and its approximate inverse
    (:meth:`_unresidual`); the loop over sublayers and the post-LN sums is shared. ``momentum`` is γ of
    :class:`Momentum`, ``coupling`` λ of :class:`Reversible` (each ignored by the other rules).
    """

    stores_every_input = False  # True: every layer call keeps its exact input (nothing is rebuilt)
    keeps_norm_stats = True  # the reverse undoes post-LN sums with the forward's (μ, σ)
    changes_forward = False  # True: not the model's own function (a pretrained model must be fine-tuned with it)

    def __init__(self, scale: float = 1.0, momentum: float = 0.9, coupling: float = 0.5) -> None:
        self.scale, self.momentum, self.coupling = scale, momentum, coupling

    def start(self, x: Tensor, carried: State = ()) -> State:
        """A layer's input state from the hidden states ``x`` and what the previous layer carried over."""
        return (x,)

    def new_record(self, x: Tensor, training: bool) -> LayerRecord:
        """What a reversible call of a layer on ``x`` keeps: RNG states if ``training``, LayerNorm statistics."""
        return LayerRecord.new(x, training, norm_stats=self.keeps_norm_stats)

    def run(self, sublayers: list[Sublayer], state: State, rec: LayerRecord) -> State:
        """The forward: state n -> state n+1."""
        x = state[0]
        for i, sub in enumerate(sublayers):
            z = self._residual(rec, i, sub, x)
            if sub.norm is None:
                x = z
                continue
            if rec.recording_stats:
                rec.stats.append(_norm_stats(z, sub.norm))
            x = sub.norm(z)
        return (x,)

    def reverse(self, sublayers: list[Sublayer], state: State, rec: LayerRecord) -> State:
        """State n+1 -> (an estimate of) state n, using the forward's record ``rec``."""
        rec, y = rec.replaying(), state[0]
        for i in reversed(range(len(sublayers))):
            sub = sublayers[i]
            z = y if sub.norm is None else _unnorm(y, rec.stats[i], sub.norm)
            y = self._unresidual(rec, i, sub, z)
        return (y,)

    def _whole_layer(self, sublayers: list[Sublayer], x: Tensor, rec: LayerRecord) -> Tensor:
        """The layer's own output at ``x`` (its sublayers by :meth:`_residual`), for rules built on whole layers."""
        return Rule.run(self, sublayers, (x,), rec)[0]

    def _f(self, rec: LayerRecord, k: int, sub: Sublayer, x: Tensor) -> Tensor:
        out = rec.branch(k, sub.branch, x)
        return out if self.scale == 1.0 else self.scale * out

    def _residual(self, rec: LayerRecord, i: int, sub: Sublayer, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _unresidual(self, rec: LayerRecord, i: int, sub: Sublayer, z: Tensor) -> Tensor:
        raise NotImplementedError


class Euler(Rule):
    """``z = x + f(x)`` per sublayer (the model's own forward); reverse ``x ≈ z − f(z)``."""

    def _residual(self, rec: LayerRecord, i: int, sub: Sublayer, x: Tensor) -> Tensor:
        return x + self._f(rec, i, sub, x)

    def _unresidual(self, rec: LayerRecord, i: int, sub: Sublayer, z: Tensor) -> Tensor:
        return z - self._f(rec, i, sub, z)


class Checkpoint(Euler):
    """Euler's forward with every layer input stored: backward recomputes each layer exactly."""

    stores_every_input = True


class Heun(Rule):
    """``z = x + ½[k1 + k2]``, k1 = f(x), k2 = f(x + k1); reverse with the same two evaluations at z."""

    changes_forward = True

    def _residual(self, rec: LayerRecord, i: int, sub: Sublayer, x: Tensor) -> Tensor:
        k1 = self._f(rec, 2 * i, sub, x)
        with outputs_not_captured():  # the second evaluation must not add an attention map to the outputs
            k2 = self._f(rec, 2 * i + 1, sub, x + k1)
        return x + 0.5 * (k1 + k2)

    def _unresidual(self, rec: LayerRecord, i: int, sub: Sublayer, z: Tensor) -> Tensor:
        k2 = self._f(rec, 2 * i + 1, sub, z)
        k1 = self._f(rec, 2 * i, sub, z - k2)
        return z - 0.5 * (k1 + k2)


class _TwoStream(Euler):
    """A rule whose state carries a second stream beside x, zero where the stack starts."""

    keeps_norm_stats = False  # the reverse runs the layer forwards at a known x: nothing to undo
    changes_forward = True

    def start(self, x: Tensor, carried: State = ()) -> State:
        return (x, *carried) if carried else (x, torch.zeros_like(x))


class Momentum(_TwoStream):
    """State (x, v): ``v' = γv + (1−γ)(layer(x) − x)``, ``x' = x + v'`` with γ = ``momentum``; exactly invertible."""

    def run(self, sublayers: list[Sublayer], state: State, rec: LayerRecord) -> State:
        x, v = state
        v = self.momentum * v + (1.0 - self.momentum) * (self._whole_layer(sublayers, x, rec) - x)
        return x + v, v

    def reverse(self, sublayers: list[Sublayer], state: State, rec: LayerRecord) -> State:
        x1, v1 = state
        x = x1 - v1
        update = self._whole_layer(sublayers, x, rec.replaying())
        return x, (v1 - (1.0 - self.momentum) * (update - x)) / self.momentum


class Reversible(_TwoStream):
    """State (x, p): ``x' = L(x) + λ·p``, ``p' = x`` with λ = ``coupling`` and ``L`` the whole layer; p = 0 enters
    the bottom layer (which computes the pretrained layer exactly). Reverse: ``x = p'``, ``p = (x' − L(x))/λ``: the
    only error is the rounding of the forward sum, divided by λ, and it grows by about ‖∂L‖/λ per layer down."""

    def run(self, sublayers: list[Sublayer], state: State, rec: LayerRecord) -> State:
        x, p = state
        return self._whole_layer(sublayers, x, rec) + self.coupling * p, x

    def reverse(self, sublayers: list[Sublayer], state: State, rec: LayerRecord) -> State:
        x1, x = state
        return x, (x1 - self._whole_layer(sublayers, x, rec.replaying())) / self.coupling


# The user-facing names of the rules, in the order the docs list them. "auto" and "off" are not rules but
# policies over BASE_RULE (see .attach): the model's own forward, also what probe_adjoint probes by default.
RULES: dict[str, type[Rule]] = {
    "euler": Euler,
    "heun": Heun,
    "checkpoint": Checkpoint,
    "momentum": Momentum,
    "reversible": Reversible,
}
BASE_RULE = "euler"
