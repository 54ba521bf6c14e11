"""Random-number-generator state: capture and restore the CPU generator and the accelerators' at one point.

Used to replay dropout and drop-path masks exactly (a layer's reverse and recomputation see the masks of its
forward) and to fork the global stream, so that replays and probes leave the randomness training sees alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch


class RngState:
    """The CPU generator's state and that of each accelerator in ``devices``, captured when constructed."""

    def __init__(self, devices: Iterable[torch.device] = ()) -> None:
        self.cpu = torch.get_rng_state()
        accelerators = {d for d in devices if d.type != "cpu"}
        self.devices = {d: torch.get_device_module(d.type).get_rng_state(d) for d in accelerators}

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for device, state in self.devices.items():
            torch.get_device_module(device.type).set_rng_state(state, device)

    @property
    def nbytes(self) -> int:
        return self.cpu.nbytes + sum(state.nbytes for state in self.devices.values())


@contextmanager
def forked_rng(devices: Iterable[torch.device] = ()) -> Iterator[RngState]:
    """Run the block on a fork of the global generators: their state on exit is their state on entry.

    Yields the captured entry state, so the block can restart from it (``state.restore()``) as often as needed.
    """
    state = RngState(devices)
    try:
        yield state
    finally:
        state.restore()
