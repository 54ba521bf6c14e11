"""The reversible-layer autograd Function: rebuild a layer's input, recompute it, return its VJPs.

Each layer call of a stack is one ``AdjointLayer.apply``. Its forward runs the layer without building a graph
and keeps only a small :class:`~.record.LayerRecord` (LayerNorm statistics, RNG states); a layer marked as an
anchor also keeps its input. The stack's latest output is kept on a per-pass :class:`Tape`. Backward runs top
down: layer n takes its output from the tape (the stack output for the top layer, else the input rebuilt by
layer n+1), rebuilds its own input by the reverse rule (or takes its stored input), puts that on the tape for
layer n−1, recomputes its forward with a graph at that point (replaying the forward's RNG states and autocast)
and returns the vector-Jacobian products for its input and its trainable parameters. Each rebuilt input goes
through the pass's :class:`~.guard.PassCheck` (finiteness, and the error against the stored exact input of a
slice of the batch on checked passes), which judges them all at the stack's bottom layer. Parameters are inputs of
the Function, so gradients reach them through autograd's usual accumulation: frozen parameters get none, shared
(tied) parameters get the sum over layers, and DDP's hooks fire as in plain backprop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .guard import PassCheck
from .layer_views import Sublayer
from .rules import Rule, State

Tensor = torch.Tensor


class Tape:
    """Per forward pass: the stack's top output, then during backward each input rebuilt for the layer below."""

    def __init__(self) -> None:
        self.top_position = -1
        self.top: State | None = None
        self.rebuilt: dict[int, State] = {}

    def put_output(self, position: int, state: State) -> None:
        # Detached aliases: holding the graph-carrying outputs here would form a reference cycle.
        self.top_position, self.top = position, tuple(s.detach() for s in state)

    def output_of(self, position: int) -> State:
        if position == self.top_position:
            return self.top
        if position in self.rebuilt:
            return self.rebuilt.pop(position)
        raise RuntimeError(
            f"adjoint: the output of layer {position} is not available to rebuild its input. The reverse pass "
            "starts from the stack's last output, so the loss must depend on it (a loss on an intermediate "
            "hidden state alone cannot be reversed): use scheme='checkpoint' for such a model."
        )

    def put_input(self, position: int, state: State) -> None:
        if position > 0:
            self.rebuilt[position - 1] = tuple(s.detach() for s in state)

    def discard_output(self, position: int) -> None:
        self.rebuilt.pop(position, None)


@dataclass
class LayerCall:
    """Everything the Function needs about one layer call besides tensors."""

    rule: Rule
    sublayers: list[Sublayer]
    tape: Tape
    position: int
    store_input: bool  # an anchor (or the checkpoint rule): keep the exact input instead of rebuilding it
    training: bool
    check: PassCheck | None = None  # the self-check of a rebuilding scheme (None: nothing checked)

    @property
    def keeps_reference(self) -> bool:
        """Whether the forward keeps the exact input to compare with the rebuilt one (a checked pass)."""
        return self.check is not None and self.check.referenced and not self.store_input


class AdjointLayer(torch.autograd.Function):
    """``apply(call, n_state, *state, *params) -> state'``: one layer, reversible in backward."""

    @staticmethod
    def forward(ctx, call: LayerCall, n_state: int, *tensors: Tensor) -> State:
        state = tensors[:n_state]
        record = call.rule.new_record(state[0], call.training)
        out = call.rule.run(call.sublayers, state, record)
        # Parameters are leaves: holding them here keeps nothing alive that the model does not.
        ctx.call, ctx.record, ctx.n_state, ctx.params = call, record, n_state, tensors[n_state:]
        device_type = state[0].device.type
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        if call.store_input:
            ctx.save_for_backward(*state)
        elif call.keeps_reference:
            ctx.save_for_backward(call.check.reference(state[0]))
        if call.check is not None:
            call.check.enter(call.position)
        call.tape.put_output(call.position, out)
        return out

    @staticmethod
    def backward(ctx, *grad_out: Tensor):
        call, record, n_state = ctx.call, ctx.record, ctx.n_state
        needs = ctx.needs_input_grad[2:]
        device_type, autocast_on, autocast_dtype = ctx.autocast
        with record.forked_rng(), torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on):
            if call.store_input:
                state = ctx.saved_tensors
                call.tape.discard_output(call.position)
            else:
                with torch.no_grad():
                    state = call.rule.reverse(call.sublayers, call.tape.output_of(call.position), record)
                if call.check is not None:
                    call.check.record(call.position, state, ctx.saved_tensors[0] if call.keeps_reference else None)
            if call.check is not None:
                call.check.finish(call.position)
            call.tape.put_input(call.position, state)
            with torch.enable_grad():
                state = tuple(s.detach().requires_grad_(n) for s, n in zip(state, needs[:n_state], strict=True))
                out = call.rule.run(call.sublayers, state, record.replaying())
                inputs = (*state, *ctx.params)
                wanted = [t for t, n in zip(inputs, needs, strict=True) if n]
                # An output that is an input passed on (reversible's p' = x) has no graph when x needs no grad.
                pairs = [(o, g) for o, g in zip(out, grad_out, strict=True) if o.requires_grad]
                live, grad_live = [o for o, _ in pairs], [g for _, g in pairs]
                grads = iter(torch.autograd.grad(live, wanted, grad_live, allow_unused=True))
        return (None, None, *(next(grads) if n else None for n in needs))
