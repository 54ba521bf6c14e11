"""Fidelity of the reverse pass: reconstruction errors per layer and the anchors the ``auto`` policy keeps.

Errors are the worst token's relative error ``max_t ‖x̂_{n,t} − x_{n,t}‖ / ‖x_{n,t}‖``, where x_n is the
exact input of layer n from a forward pass. The *step* error rebuilds x_n from the exact x_{n+1} (one reverse step);
the *chained* error rebuilds it from the stack output through all layers above, as the adjoint does. The auto
policy walks down the stack and stores the input of every layer whose chained error would exceed the tolerance
(an anchor), restarting the chain from that exact value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .steps import LayerRecord, LayerStep, State, new_record

Tensor = torch.Tensor


def relative_error(estimate: Tensor, exact: Tensor) -> float:
    """The worst token's relative error, max_t ‖x̂_t − x_t‖ / ‖x_t‖ over all (batch, position) vectors.

    Per token, not over the whole tensor: a pre-LN block amplifies errors by 1/‖x_t‖, so one small token
    (a CLS token initialised near zero) can carry a wrong gradient that a global ratio would hide.
    """
    exact64 = exact.detach().double()
    error = (estimate.detach().double() - exact64).norm(dim=-1)
    return float((error / exact64.norm(dim=-1).clamp_min(1e-300)).max())


@dataclass
class Reconstruction:
    """Per layer n (input of layer n): step errors, chained errors without anchors, greedy anchors."""

    step_errors: list[float]
    chained_errors: list[float]
    anchors: list[int]
    decision_errors: list[float]  # chained errors with the anchors above each layer (what auto compares)
    record_bytes: list[int]  # what each reversible layer call keeps (LayerNorm statistics, RNG states)


@torch.no_grad()
def measure_reconstruction(
    steps: list[LayerStep], x0: State, training: bool, tolerance: float, full: bool = True
) -> Reconstruction:
    """Run the stack forward from ``x0`` (exactly, keeping every state), then reverse it.

    ``full=False`` skips the step and anchor-free chained errors (the auto policy needs only the anchors).
    Random layers replay their own forward masks, so the measurement holds for this batch and these masks.
    """
    states, records = [x0], []
    devices = [] if x0[0].device.type == "cpu" else [x0[0].device]
    with torch.random.fork_rng(devices=devices, device_type=x0[0].device.type):
        for step in steps:
            rec = new_record(x0[0], training, reversible=step.rule != "momentum")
            states.append(step.run(states[-1], rec))
            records.append(rec)
        n_layers = len(steps)

        def rebuild(n: int, out: State) -> State:
            return steps[n].reverse(out, records[n])

        anchored, anchors, current = [0.0] * n_layers, [], states[-1]
        for n in reversed(range(n_layers)):
            rebuilt = rebuild(n, current)
            anchored[n] = relative_error(rebuilt[0], states[n][0])
            if anchored[n] > tolerance:
                anchors.append(n)
                current = states[n]
            else:
                current = rebuilt
        step_errors, chained = [], []
        if full:
            step_errors = [relative_error(rebuild(n, states[n + 1])[0], states[n][0]) for n in range(n_layers)]
            chained, current = [0.0] * n_layers, states[-1]
            for n in reversed(range(n_layers)):
                current = rebuild(n, current)
                chained[n] = relative_error(current[0], states[n][0])
    return Reconstruction(step_errors, chained, sorted(anchors), anchored, [record_bytes(r) for r in records])


def saved_activation_bytes(step: LayerStep, layer: torch.nn.Module, state: State, training: bool) -> int:
    """Bytes plain backprop keeps for one call of ``layer`` (saved tensors other than its parameters)."""
    seen: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    devices = [] if state[0].device.type == "cpu" else [state[0].device]
    with torch.random.fork_rng(devices=devices, device_type=state[0].device.type), torch.enable_grad():
        inputs = tuple(s.detach().requires_grad_() for s in state)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            step.run(inputs, new_record(state[0], training, reversible=False))
    return sum(seen.values())


def record_bytes(record: LayerRecord) -> int:
    """Bytes a reversible layer call keeps: LayerNorm statistics and RNG states."""
    total = sum(m.nbytes + s.nbytes for m, s in record.stats or [])
    return total + sum(r.cpu.nbytes + (0 if r.accel is None else r.accel.nbytes) for r in record.rng or [])
