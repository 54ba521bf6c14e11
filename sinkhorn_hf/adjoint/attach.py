"""Attaching an adjoint scheme to one layer stack, and routing each layer call.

Each layer module of a stack gets an instance-level ``forward`` that runs the layer through
:class:`~.function.AdjointLayer`; a forward pre-hook on the module that loops over the layers starts a new
:class:`~.function.Tape` per pass, and layer calls are numbered in the order they happen (so ALBERT's shared
layers get one position per use). Nothing else of the model changes: its own submodules (attention included)
run as before, and the state dict is untouched.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from typing import Any

import torch
from torch import nn

from ..compat import outputs_not_captured
from ..families import UnsupportedModelError
from .auto import AutoChoice, choose_anchors, probe_due
from .function import AdjointLayer, LayerCall, Tape
from .guard import PassCheck, RebuildGuard, check_rows, rows_of
from .layer_views import Stack, Sublayer
from .probe import Reconstruction, measure_reconstruction
from .record import LayerRecord
from .rules import BASE_RULE, RULES, State

AUTO, OFF, REVERSIBLE = (
    "auto",
    "off",
    "reversible",
)  # the schemes that are policies over Euler's rule rather than rules of their own
SCHEMES = (AUTO, *RULES, OFF)
FORWARD_CHANGING_SCHEMES = tuple(name for name, rule in RULES.items() if rule.changes_forward)
_ENCODER_DECODER_ARGS = ("encoder_hidden_states", "encoder_attention_mask", "cache", "past_key_values")


class _Pass:
    """One forward pass through a stack: its tape, the next position, what the last layer carried over, and the
    self-check its backward runs (made at the pass's first reversible layer call)."""

    def __init__(self) -> None:
        self.tape, self.position, self.carried = Tape(), 0, ()
        self.check: PassCheck | None = None


class AdjointStack:
    """One layer stack of a model under an adjoint scheme (see :func:`~.api.enable_adjoint`).

    ``rule`` runs and reverses each layer; ``anchors`` are the positions whose exact input is stored; under
    ``auto`` they are re-chosen at each probe (``choice``); under ``off`` the layers run the rule with plain
    autograd (a residual scale other than 1 is still applied). A scheme that rebuilds inputs checks itself
    (``guard``, see :mod:`.guard`; None under ``checkpoint`` and ``off``).
    """

    def __init__(
        self,
        stack: Stack,
        scheme: str,
        tolerance: float,
        probe_every: int | None,
        scale: float,
        momentum: float,
        allow_inexact: bool = False,
        reference_rows: int | None = None,
        coupling: float | None = None,
    ):
        self.stack, self.scheme, self.tolerance, self.probe_every = stack, scheme, tolerance, probe_every
        self.reference_rows = reference_rows
        self.settings = dict(
            scheme=scheme,
            tolerance=tolerance,
            probe_every=probe_every,
            momentum=momentum,
            allow_inexact=allow_inexact,
            reference_rows=reference_rows,
            coupling=coupling if scheme == REVERSIBLE else None,  # "off" reads it from the config
        )
        # "off" on a coupled model runs the coupling with plain autograd; "auto" and "off" are Euler's otherwise.
        rule = scheme if scheme in RULES else REVERSIBLE if coupling is not None else BASE_RULE
        self.rule = RULES[rule](scale, momentum, *([] if coupling is None else [coupling]))
        self.n_layers = len(stack.positions)
        self.anchors: set[int] = set(range(self.n_layers)) if self.rule.stores_every_input else set()
        self.choice: AutoChoice | None = None
        rebuilds = scheme != OFF and not self.rule.stores_every_input
        # auto's probe already bounds the rebuild errors: its backward checks finiteness only.
        label = f"{scheme!r} on {stack.name}"
        self.guard = (
            RebuildGuard(label, tolerance, allow_inexact, references=scheme != AUTO, reference_rows=reference_rows)
            if rebuilds
            else None
        )
        self._unguarded = False
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

    def storing_every_input(self) -> AbstractContextManager[None]:
        """Exact backprop of the same forward rule (every layer stores its input), e.g. as a reference."""
        return self._switched_on("_override_store_all")

    def unguarded(self) -> AbstractContextManager[None]:
        """Passes begun in the block are not self-checked (a probe measures what the guard would refuse)."""
        return self._switched_on("_unguarded")

    @contextmanager
    def _switched_on(self, flag: str) -> Iterator[None]:
        setattr(self, flag, True)
        try:
            yield
        finally:
            setattr(self, flag, False)

    # -- what it is and what it chose ------------------------------------------------------------------
    def __repr__(self) -> str:
        return (
            f"AdjointStack({self.stack.name!r}, scheme={self.scheme!r}, layers={self.n_layers}, "
            f"anchors={sorted(self.anchors)}, tolerance={self.tolerance:g}, residual_scale={self.rule.scale:g})"
        )

    def describe(self) -> str:
        """One line: the scheme on this stack and what it measured (auto's choice, or the last self-check)."""
        if self.choice is not None:
            return self.choice.describe(self.stack.name, self.n_layers)
        scale = "" if self.rule.scale == 1.0 else f", residual scale {self.rule.scale:.3g}"
        head = f"adjoint {self.scheme} on {self.stack.name} ({self.n_layers} layers{scale})"
        if self.scheme == AUTO:
            return f"{head}: not probed yet (it probes on the first batch that builds a graph)."
        if self.guard is None:
            return f"{head}: " + ("plain backprop." if self.scheme == OFF else "stores every layer input (exact).")
        if self.guard.errors is None:
            return f"{head}: rebuilds every layer input; not checked yet (checked at the first backward)."
        errors = ", ".join(f"{e:.2g}" for _, e in sorted(self.guard.errors.items()))
        return (
            f"{head}: rebuilds every layer input; rebuild errors [{errors}] at pass {self.guard.checked_pass} "
            f"(tolerance {self.tolerance:g})."
        )

    def auto_state(self) -> dict[str, Any] | None:
        """What auto chose, JSON-serialisable: ``{"passes": n, "choice": AutoChoice.to_dict()}`` (None before)."""
        return None if self.choice is None else {"passes": self.passes, "choice": self.choice.to_dict()}

    def restore_auto_state(self, state: Mapping[str, Any]) -> None:
        """Take the anchors of :meth:`auto_state`'s ``state`` without probing; later probes keep ``probe_every``'s
        schedule (the pass count is restored too)."""
        where = f"restoring the auto choice of {self.stack.name}"
        if self.scheme != AUTO:
            raise ValueError(f"{where}: the stack is under scheme {self.scheme!r}, not 'auto'.")
        passes = state.get("passes") if isinstance(state, Mapping) else None
        if not isinstance(passes, int) or isinstance(passes, bool) or passes < 1 or set(state) != {"passes", "choice"}:
            raise ValueError(f"{where}: expected {{'passes': int ≥ 1, 'choice': {{...}}}}, got {state!r}.")
        choice = AutoChoice.from_dict(state["choice"], self.n_layers, where)
        if choice.tolerance != self.tolerance:
            raise ValueError(
                f"{where}: it was chosen at tolerance {choice.tolerance:g}, the stack now has {self.tolerance:g}."
            )
        self.choice, self.anchors, self.passes = choice, set(choice.anchors), passes

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
            call = LayerCall(
                self.rule, sublayers, run.tape, position, store, training=layer.training, check=self._pass_check(run)
            )
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
        if self.scheme == AUTO and probe_due(self.choice is not None, self.passes, self.probe_every):
            # The probe keeps every layer's state: on a slice of the batch, so that it costs no peak memory.
            rows = check_rows(hidden_states, self.reference_rows)
            mask, sliced_kwargs = _rows_of_call(attention_mask, kwargs, rows, hidden_states.shape[0])
            self.choice = choose_anchors(
                self.stack.name,
                self.rule,
                self._layers(mask, sliced_kwargs),
                self.stack.positions[0],
                self._x0(rows_of(hidden_states, rows)),
                training,
                self.tolerance,
                self.passes,
                batch_share=1.0 if rows is None else hidden_states.shape[0] / len(rows),
            )
            self.anchors = set(self.choice.anchors)

    def _pass_check(self, run: _Pass) -> PassCheck | None:
        """The self-check of ``run`` (None when nothing is rebuilt, or checks are off); on a checked pass (the
        first that builds a graph until one backward has been checked, then every ``probe_every``) the layers keep
        their exact inputs as references."""
        if self.guard is None or self._override_store_all or self._unguarded:
            return None
        if run.check is None:
            referenced = probe_due(self.guard.checked_pass is not None, self.passes, self.probe_every)
            run.check = self.guard.new_pass(self.passes, referenced)
        return run.check


def _rows_of_call(attention_mask: Any, kwargs: dict, rows: torch.Tensor | None, batch: int) -> tuple[Any, dict]:
    """The layer-call arguments for the ``rows`` of a batch of ``batch``: tensors with a batch dimension (the
    attention mask: (B, 1, T, T) or (B, 1, 1, T); a mask broadcast over the batch stays as it is)."""

    def take(value: Any) -> Any:
        batched = isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == batch > 1
        return rows_of(value, rows) if batched else value

    if rows is None:
        return attention_mask, kwargs
    return take(attention_mask), {name: take(value) for name, value in kwargs.items()}


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
