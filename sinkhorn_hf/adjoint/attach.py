"""Attaching an adjoint scheme to one layer stack, and routing each layer call.

Each layer module of a stack gets an instance-level ``forward`` that runs the layer through
:class:`~.function.AdjointLayer`; a forward pre-hook on the module that loops over the layers starts a new
:class:`~.function.Tape` per pass, and layer calls are numbered in the order they happen (so ALBERT's shared
layers get one position per use). Nothing else of the model changes: its own submodules (attention included)
run as before, and the state dict is untouched.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import nn

from ..compat import outputs_not_captured
from ..families import UnsupportedModelError
from .auto import AutoChoice, choose_anchors, probe_due
from .function import AdjointLayer, LayerCall, Tape
from .layer_views import Stack, Sublayer
from .probe import Reconstruction, measure_reconstruction
from .record import LayerRecord
from .rules import BASE_RULE, RULES, State

AUTO, OFF = "auto", "off"  # the schemes that are policies over Euler's rule rather than rules of their own
SCHEMES = (AUTO, *RULES, OFF)
FORWARD_CHANGING_SCHEMES = tuple(name for name, rule in RULES.items() if rule.changes_forward)
_ENCODER_DECODER_ARGS = ("encoder_hidden_states", "encoder_attention_mask", "cache", "past_key_values")


class _Pass:
    """One forward pass through a stack: its tape, the next position, what the last layer carried over."""

    def __init__(self) -> None:
        self.tape, self.position, self.carried = Tape(), 0, ()


class AdjointStack:
    """One layer stack of a model under an adjoint scheme (see :func:`~.api.enable_adjoint`).

    ``rule`` runs and reverses each layer; ``anchors`` are the positions whose exact input is stored; under
    ``auto`` they are re-chosen at each probe (``choice``); under ``off`` the layers run the rule with plain
    autograd (a residual scale other than 1 is still applied).
    """

    def __init__(
        self, stack: Stack, scheme: str, tolerance: float, probe_every: int | None, scale: float, momentum: float
    ):
        self.stack, self.scheme, self.tolerance, self.probe_every = stack, scheme, tolerance, probe_every
        self.settings = dict(scheme=scheme, tolerance=tolerance, probe_every=probe_every, momentum=momentum)
        self.rule = RULES.get(scheme, RULES[BASE_RULE])(scale, momentum)
        self.n_layers = len(stack.positions)
        self.anchors: set[int] = set(range(self.n_layers)) if self.rule.stores_every_input else set()
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
    def _layer_forward(
        self, layer: nn.Module, hidden_states: torch.Tensor, attention_mask: Any = None, *extra: Any, **kwargs: Any
    ) -> torch.Tensor:
        _check_layer_call(layer, attention_mask, extra, kwargs)
        sublayers = self.stack.view(layer, attention_mask, kwargs)
        run = self._pass
        position = None if run is None else run.position
        if run is not None:
            run.position += 1
        state = self.rule.start(hidden_states, () if run is None else run.carried)
        trainable = [p for p in layer.parameters() if p.requires_grad]
        builds_graph = torch.is_grad_enabled() and (hidden_states.requires_grad or bool(trainable))
        if position == 0:
            with outputs_not_captured():
                self._maybe_probe(hidden_states, attention_mask, kwargs, layer.training, builds_graph)
        if not builds_graph or position is None or self.scheme == OFF:
            out = self.rule.run(sublayers, state, LayerRecord.new(hidden_states, training=False, norm_stats=False))
        else:
            store = self._override_store_all or position in self.anchors
            call = LayerCall(self.rule, sublayers, run.tape, position, store_input=store, training=layer.training)
            out = AdjointLayer.apply(call, len(state), *state, *trainable)
        if run is not None:
            run.carried = out[1:]
        return out[0]

    # -- probing ---------------------------------------------------------------------------------------
    def _layers(self, attention_mask: Any, kwargs: dict) -> list[list[Sublayer]]:
        return [self.stack.view(layer, attention_mask, kwargs) for layer in self.stack.positions]

    def _x0(self, hidden_states: torch.Tensor) -> State:
        return self.rule.start(hidden_states.detach())

    def _maybe_probe(self, hidden_states, attention_mask, kwargs, training: bool, builds_graph: bool) -> None:
        if self._probe_requested:
            self._probe_requested = False
            self.reconstruction = measure_reconstruction(
                self.rule, self._layers(attention_mask, kwargs), self._x0(hidden_states), training, self.tolerance
            )
        if not builds_graph or self._override_store_all:
            return
        self.passes += 1
        if self.scheme == AUTO and probe_due(self.choice, self.passes, self.probe_every):
            self.choice = choose_anchors(
                self.stack.name,
                self.rule,
                self._layers(attention_mask, kwargs),
                self.stack.positions[0],
                self._x0(hidden_states),
                training,
                self.tolerance,
                self.passes,
            )
            self.anchors = set(self.choice.anchors)


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


def adjoint_stacks(model: nn.Module) -> list[AdjointStack]:
    """The :class:`AdjointStack` objects currently attached to ``model`` (empty when the adjoint is off)."""
    return [m._sinkhorn_adjoint for m in model.modules() if hasattr(m, "_sinkhorn_adjoint")]
