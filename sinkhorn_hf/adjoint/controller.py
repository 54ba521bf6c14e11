"""Putting a model's layer stacks under the adjoint: schemes, the ``auto`` policy, enable/disable.

Each layer module of a stack gets an instance-level ``forward`` that runs the layer through
:class:`~.stack.AdjointLayer`; a forward pre-hook on the module that loops over the layers starts a new
:class:`~.stack.Tape` per pass, and layer calls are numbered in the order they happen (so ALBERT's shared
layers get one position per use). Nothing else of the model changes: its own submodules (attention included)
run as before, and the state dict is untouched.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from ..families import UnsupportedModelError
from .blocks import Stack, find_stacks
from .probe import Reconstruction, measure_reconstruction, saved_activation_bytes
from .stack import AdjointLayer, LayerCall, Tape
from .steps import LayerStep, new_record, outputs_not_captured

logger = logging.getLogger(__name__)

SCHEMES = ("auto", "euler", "heun", "checkpoint", "momentum", "off")
RULE_OF_SCHEME = {"auto": "euler", "euler": "euler", "checkpoint": "euler", "off": "euler"}
DEFAULT_TOLERANCE = 1e-2
SCALE_ATTRIBUTE = "adjoint_residual_scale"  # config attribute: a float or "1/L"
_ENCODER_DECODER_ARGS = ("encoder_hidden_states", "encoder_attention_mask", "cache", "past_key_values")
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


class _Pass:
    """One forward pass through a stack: its tape, the next position, the momentum velocity."""

    def __init__(self) -> None:
        self.tape, self.position, self.velocity = Tape(), 0, None


class AdjointStack:
    """One layer stack of a model under an adjoint scheme (see :func:`enable_adjoint`)."""

    def __init__(
        self, stack: Stack, scheme: str, tolerance: float, probe_every: int | None, scale: float, momentum: float
    ):
        self.stack, self.scheme, self.tolerance, self.probe_every = stack, scheme, tolerance, probe_every
        self.settings = {"scheme": scheme, "tolerance": tolerance, "probe_every": probe_every, "momentum": momentum}
        self.rule = RULE_OF_SCHEME.get(scheme, scheme)
        self.scale, self.momentum = scale, momentum
        self.n_layers = len(stack.positions)
        self.anchors: set[int] = set(range(self.n_layers)) if scheme == "checkpoint" else set()
        self.choice: AutoChoice | None = None
        self.reconstruction: Reconstruction | None = None  # filled when a probe is requested
        self.passes = 0  # forward passes that built a graph
        self._pass: _Pass | None = None
        self._probe_requested = False
        self._override_store_all = False
        self._handles = [
            stack.owner.register_forward_pre_hook(self._begin_pass),
            stack.owner.register_forward_hook(self._end_pass),
        ]
        self._patched = list({id(layer): layer for layer in stack.positions}.values())
        for layer in self._patched:
            layer.forward = partial(self._layer_forward, layer)
        stack.owner._sinkhorn_adjoint = self

    # -- lifecycle -------------------------------------------------------------------------------------
    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for layer in self._patched:
            del layer.forward
        del self.stack.owner._sinkhorn_adjoint

    def request_probe(self) -> None:
        """Measure rebuild errors (into ``self.reconstruction``) on the next pass, with or without grad."""
        self._probe_requested = True

    @contextmanager
    def storing_every_input(self):
        """Exact backprop of the same forward rule (every layer stores its input), e.g. as a reference."""
        self._override_store_all = True
        try:
            yield
        finally:
            self._override_store_all = False

    def _begin_pass(self, module: nn.Module, args: Any) -> None:
        self._pass = _Pass()

    def _end_pass(self, module: nn.Module, args: Any, output: Any) -> None:
        self._pass = None

    # -- one layer call --------------------------------------------------------------------------------
    def layer_step(self, layer: nn.Module, attention_mask: Any, kwargs: dict) -> LayerStep:
        return LayerStep(self.stack.view(layer, attention_mask, kwargs), self.rule, self.scale, self.momentum)

    def _layer_forward(
        self, layer: nn.Module, hidden_states: torch.Tensor, attention_mask: Any = None, *extra: Any, **kwargs: Any
    ) -> torch.Tensor:
        _check_layer_call(layer, attention_mask, extra, kwargs)
        step = self.layer_step(layer, attention_mask, kwargs)
        run = self._pass
        position = None if run is None else run.position
        if run is not None:
            run.position += 1
        state = (hidden_states,)
        if self.rule == "momentum":
            velocity = None if run is None or position == 0 else run.velocity
            state = (hidden_states, torch.zeros_like(hidden_states) if velocity is None else velocity)
        trainable = [p for p in layer.parameters() if p.requires_grad]
        builds_graph = torch.is_grad_enabled() and (hidden_states.requires_grad or bool(trainable))
        if position == 0:
            with outputs_not_captured():
                self._maybe_probe(hidden_states, attention_mask, kwargs, layer.training, builds_graph)
        if not builds_graph or position is None or self.scheme == "off":
            out = step.run(state, new_record(hidden_states, training=False, reversible=False))
        else:
            store = self._override_store_all or position in self.anchors
            call = LayerCall(step, run.tape, position, store_input=store, training=layer.training)
            out = AdjointLayer.apply(call, len(state), *state, *trainable)
        if run is not None and self.rule == "momentum":
            run.velocity = out[1]
        return out[0]

    # -- probing ---------------------------------------------------------------------------------------
    def _steps(self, attention_mask: Any, kwargs: dict) -> list[LayerStep]:
        return [self.layer_step(layer, attention_mask, kwargs) for layer in self.stack.positions]

    def _x0(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x0 = hidden_states.detach()
        return (x0, torch.zeros_like(x0)) if self.rule == "momentum" else (x0,)

    def _maybe_probe(self, hidden_states, attention_mask, kwargs, training: bool, builds_graph: bool) -> None:
        if self._probe_requested:
            self._probe_requested = False
            self.reconstruction = measure_reconstruction(
                self._steps(attention_mask, kwargs), self._x0(hidden_states), training, self.tolerance
            )
        if not builds_graph or self._override_store_all:
            return
        self.passes += 1
        if self.scheme == "auto" and (
            self.choice is None or (self.probe_every is not None and (self.passes - 1) % self.probe_every == 0)
        ):
            self._choose_anchors(hidden_states, attention_mask, kwargs, training)

    def _choose_anchors(self, hidden_states, attention_mask, kwargs, training: bool) -> None:
        steps, x0 = self._steps(attention_mask, kwargs), self._x0(hidden_states)
        found = measure_reconstruction(steps, x0, training, self.tolerance, full=False)
        state_bytes = sum(t.nbytes for t in x0)
        plain = saved_activation_bytes(steps[0], self.stack.positions[0], x0, training) * self.n_layers
        kept = [state_bytes if n in found.anchors else found.record_bytes[n] for n in range(self.n_layers)]
        self.anchors = set(found.anchors)
        self.choice = AutoChoice(
            self.passes,
            found.decision_errors,
            found.anchors,
            self.tolerance,
            adjoint_bytes=sum(kept) + state_bytes,
            checkpoint_bytes=state_bytes * (self.n_layers + 1),
            plain_bytes=plain,
        )
        logger.info(self.choice.describe(self.stack.name, self.n_layers))


def _check_layer_call(layer: nn.Module, attention_mask: Any, extra: tuple, kwargs: dict) -> None:
    if getattr(layer, "gradient_checkpointing", False) and layer.training:
        raise RuntimeError(
            "adjoint and transformers' gradient checkpointing are both enabled on this model; the adjoint "
            "replaces it: call model.gradient_checkpointing_disable() (or use scheme='checkpoint')."
        )
    for name in _ENCODER_DECODER_ARGS:
        extra = (*extra, kwargs.pop(name, None))
    if any(value is not None for value in extra):
        raise UnsupportedModelError(
            "the adjoint supports encoder self-attention stacks only: got cross-attention inputs or a cache."
        )
    for name, value in [("attention_mask", attention_mask), *kwargs.items()]:
        if isinstance(value, torch.Tensor) and value.requires_grad:
            raise ValueError(
                f"adjoint: the layer argument {name!r} requires grad; only hidden states and parameters get "
                "gradients through the adjoint. Detach it or use plain backprop."
            )


def _resolve_scale(spec: Any, n_layers: int) -> float:
    if spec is None:
        return 1.0
    if spec == "1/L":
        return 1.0 / n_layers
    if isinstance(spec, (int, float)) and not isinstance(spec, bool) and spec > 0:
        return float(spec)
    raise ValueError(f"residual_scale must be a positive number or '1/L', got {spec!r}.")


def adjoint_stacks(model: nn.Module) -> list[AdjointStack]:
    """The :class:`AdjointStack` objects currently attached to ``model`` (empty when the adjoint is off)."""
    return [m._sinkhorn_adjoint for m in model.modules() if hasattr(m, "_sinkhorn_adjoint")]


def enable_adjoint(
    model: nn.Module,
    scheme: str = "auto",
    tolerance: float = DEFAULT_TOLERANCE,
    *,
    probe_every: int | None = None,
    residual_scale: float | str | None = None,
    momentum: float = 0.9,
) -> list[AdjointStack]:
    """Train ``model``'s residual layer stack(s) with memory-saving backward passes.

    Schemes: ``"euler"`` rebuilds each layer input by the reverse step (the model's forward is unchanged);
    ``"heun"`` uses Heun's forward and reverse (changes the forward); ``"checkpoint"`` stores each layer input and
    recomputes (exact); ``"momentum"`` makes the stack exactly invertible with momentum residuals (changes the
    forward, to be fine-tuned); ``"auto"`` (Euler forward) probes the reconstruction on the first training batch
    (and every ``probe_every`` batches), stores an exact anchor at each layer whose rebuilt input would be off
    by more than ``tolerance`` (relative), rebuilds the rest, and logs the choice; ``"off"`` runs plain backprop.
    ``residual_scale`` multiplies every residual branch (``"1/L"``: one over the stack depth, for ODE-like
    models); it is stored as ``config.adjoint_residual_scale`` (None: read it from there, default 1), survives
    ``save_pretrained``, and is applied by this function only: call it again after reloading.
    Returns the attached stacks (their ``anchors`` and ``choice`` can be inspected).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown adjoint scheme {scheme!r}; choose one of {', '.join(SCHEMES)}.")
    if not isinstance(tolerance, (int, float)) or isinstance(tolerance, bool) or not tolerance > 0:
        raise ValueError(f"tolerance must be a positive number (relative error), got {tolerance!r}.")
    if probe_every is not None and (not isinstance(probe_every, int) or probe_every < 1):
        raise ValueError(f"probe_every must be None or an integer ≥ 1, got {probe_every!r}.")
    if not 0.0 < momentum < 1.0:
        raise ValueError(f"momentum must lie in (0, 1) (0 cannot be inverted), got {momentum!r}.")
    config = getattr(model, "config", None)
    if residual_scale is not None:
        _resolve_scale(residual_scale, 1)
    spec = residual_scale if residual_scale is not None else getattr(config, SCALE_ATTRIBUTE, None)
    _remove_stacks(model)
    if scheme == "off" and spec in (None, 1, 1.0):
        if config is not None and residual_scale is not None:
            setattr(config, SCALE_ATTRIBUTE, residual_scale)
        return []
    stacks = find_stacks(model)
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise UnsupportedModelError("the adjoint supports bidirectional encoders only (config.is_decoder is set).")
    flag = (
        "is_activation_checkpointing" if hasattr(model, "is_activation_checkpointing") else "is_gradient_checkpointing"
    )
    if getattr(model, flag, False):
        raise ValueError(
            "gradient checkpointing is enabled on this model; the adjoint replaces it: call "
            "model.gradient_checkpointing_disable() first (scheme='checkpoint' gives the same exact recomputation)."
        )
    if residual_scale is not None:
        setattr(config, SCALE_ATTRIBUTE, residual_scale)
    return [
        AdjointStack(s, scheme, float(tolerance), probe_every, _resolve_scale(spec, len(s.positions)), momentum)
        for s in stacks
    ]


def disable_adjoint(model: nn.Module) -> None:
    """Give the layers back their own forward (plain backprop).

    A model with a residual scale other than 1 keeps it (its function depends on it): its layers stay wrapped
    with scheme ``"off"``.
    """
    _remove_stacks(model)
    config = getattr(model, "config", None)
    spec = getattr(config, SCALE_ATTRIBUTE, None)
    if spec not in (None, 1, 1.0):
        for s in find_stacks(model):
            AdjointStack(s, "off", DEFAULT_TOLERANCE, None, _resolve_scale(spec, len(s.positions)), 0.9)


def _remove_stacks(model: nn.Module) -> None:
    for stack in adjoint_stacks(model):
        stack.remove()
