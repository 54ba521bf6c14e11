"""One layer under a forward rule, run forwards and in reverse.

Rules, per sublayer ``x -> N(x + f(x))`` with ``f = s·b`` (see :mod:`.blocks`; no ``N`` for pre-LN):

- ``euler``: ``z = x + f(x)`` (the pretrained model's own forward). Reverse: ``x ≈ z − f(z)``.
- ``heun``: ``z = x + ½[f(x) + f(x + f(x))]`` (changes the function). Reverse:
  ``x ≈ z − ½[f(z) + f(z − f(z))]``, second order when f is smooth in depth (Sander et al., NeurIPS 2022).
- ``momentum``: on the whole layer ``F(x) = layer(x) − x`` with a velocity ``v`` (Sander et al., ICML 2021):
  ``v' = γv + (1−γ)F(x)``, ``x' = x + v'``. Exactly invertible: ``x = x' − v'``, ``v = (v' − (1−γ)F(x))/γ``.

For post-LN sublayers the reverse first undoes ``N`` with the statistics stored in the forward:
``z = (y − β)/γ_N · σ + μ`` (μ, σ: two floats per token). Randomness (dropout, drop-path) is replayed: the
global RNG state before every branch evaluation is recorded in the forward and restored whenever that
evaluation is repeated, so masks match exactly.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

try:  # transformers' collector of output_attentions / output_hidden_states (private; absent in old versions)
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # pragma: no cover
    _active_collector = None

import torch

from .blocks import Sublayer

Tensor = torch.Tensor
State = tuple[Tensor, ...]  # (x,) or (x, v) for momentum

RULES = ("euler", "heun", "momentum")


class RngState:
    """The CPU RNG state and, for accelerator tensors, the device's, at one point of the forward."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.accel = None if device.type == "cpu" else torch.get_device_module(device.type).get_rng_state(device)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.accel is not None:
            torch.get_device_module(self.device.type).set_rng_state(self.accel, self.device)


@dataclass
class LayerRecord:
    """What a layer call keeps for its reverse pass: LayerNorm statistics and RNG states.

    ``rng`` is None when the layer is in eval mode (nothing random to replay); ``stats`` is None when the
    layer will not be reversed. ``replay`` switches a record from recording (forward) to replaying (reverse
    and recomputation).
    """

    device: torch.device
    rng: list[RngState] | None
    stats: list[tuple[Tensor, Tensor]] | None = None
    replay: bool = False

    def branch(self, k: int, sub: Sublayer, x: Tensor) -> Tensor:
        """Evaluate the k-th branch call of this layer with the random state it had in the forward."""
        if self.rng is not None:
            if self.replay:
                self.rng[k].restore()
            else:
                self.rng.append(RngState(self.device))
        return sub.branch(x)

    @contextmanager
    def forked_rng(self):
        """Replays must not move the global RNG stream that the rest of training sees."""
        if self.rng is None:
            yield
            return
        devices = [] if self.device.type == "cpu" else [self.device]
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            yield

    def replaying(self) -> LayerRecord:
        return LayerRecord(self.device, self.rng, self.stats, replay=True)


def _wide(t: Tensor) -> Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


@contextmanager
def outputs_not_captured():
    """Extra evaluations (Heun's second call, probes) must not add attention maps to the model's outputs."""
    if _active_collector is None:
        yield
        return
    token = _active_collector.set(None)
    try:
        yield
    finally:
        _active_collector.reset(token)


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


@dataclass
class LayerStep:
    """One layer (its sublayers) under a forward rule with residual scale ``scale`` and momentum ``gamma``."""

    sublayers: list[Sublayer]
    rule: str = "euler"
    scale: float = 1.0
    gamma: float = 0.9

    @property
    def state_size(self) -> int:
        return 2 if self.rule == "momentum" else 1

    def _f(self, rec: LayerRecord, k: int, sub: Sublayer, x: Tensor) -> Tensor:
        out = rec.branch(k, sub, x)
        return out if self.scale == 1.0 else self.scale * out

    def _residual_layer(self, x: Tensor, rec: LayerRecord) -> Tensor:
        heun = self.rule == "heun"
        for i, sub in enumerate(self.sublayers):
            if heun:
                k1 = self._f(rec, 2 * i, sub, x)
                with outputs_not_captured():
                    k2 = self._f(rec, 2 * i + 1, sub, x + k1)
                z = x + 0.5 * (k1 + k2)
            else:
                z = x + self._f(rec, i, sub, x)
            if sub.norm is None:
                x = z
                continue
            if rec.stats is not None and not rec.replay:
                rec.stats.append(_norm_stats(z, sub.norm))
            x = sub.norm(z)
        return x

    def run(self, state: State, rec: LayerRecord) -> State:
        """The forward: state n -> state n+1."""
        if self.rule != "momentum":
            return (self._residual_layer(state[0], rec),)
        x, v = state
        v = self.gamma * v + (1.0 - self.gamma) * (self._residual_layer(x, rec) - x)
        return x + v, v

    def reverse(self, state: State, rec: LayerRecord) -> State:
        """State n+1 -> (an estimate of) state n, using the forward's record ``rec``."""
        rec = rec.replaying()
        if self.rule == "momentum":
            x1, v1 = state
            x = x1 - v1
            return x, (v1 - (1.0 - self.gamma) * (self._residual_layer(x, rec) - x)) / self.gamma
        y = state[0]
        for i in reversed(range(len(self.sublayers))):
            sub = self.sublayers[i]
            z = y if sub.norm is None else _unnorm(y, rec.stats[i], sub.norm)
            if self.rule == "heun":
                k2 = self._f(rec, 2 * i + 1, sub, z)
                k1 = self._f(rec, 2 * i, sub, z - k2)
                y = z - 0.5 * (k1 + k2)
            else:
                y = z - self._f(rec, i, sub, z)
        return (y,)


def new_record(x: Tensor, training: bool, reversible: bool) -> LayerRecord:
    """A fresh record for a forward call: RNG states if ``training``, LayerNorm stats if ``reversible``."""
    return LayerRecord(x.device, [] if training else None, [] if reversible else None)
