"""What one layer call keeps for its reverse pass: LayerNorm statistics and the RNG state of each branch call."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from .rng import RngState, forked_rng

Tensor = torch.Tensor


@dataclass
class LayerRecord:
    """Kept by a layer call: the RNG state before each branch call, the (μ, σ) of each post-LN sum.

    ``rng`` is None when the layer is in eval mode (nothing random to replay); ``stats`` is None when the
    layer will not be undone through its LayerNorms. ``replay`` switches a record from recording (forward) to
    replaying (reverse and recomputation).
    """

    device: torch.device
    rng: list[RngState] | None
    stats: list[tuple[Tensor, Tensor]] | None = None
    replay: bool = False

    @classmethod
    def new(cls, x: Tensor, training: bool, norm_stats: bool) -> LayerRecord:
        """A fresh record for a forward call on ``x``: RNG states if ``training``, LayerNorm stats if asked."""
        return cls(x.device, [] if training else None, [] if norm_stats else None)

    def branch(self, k: int, branch: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        """Evaluate the layer's k-th branch call with the random state it had in the forward."""
        if self.rng is not None:
            if self.replay:
                self.rng[k].restore()
            else:
                self.rng.append(RngState([self.device]))
        return branch(x)

    @property
    def recording_stats(self) -> bool:
        """Whether a post-LN sum evaluated now should append its (μ, σ) to ``stats``."""
        return self.stats is not None and not self.replay

    def forked_rng(self) -> AbstractContextManager:
        """Replays must not move the global RNG stream that the rest of training sees."""
        if self.rng is None:
            return nullcontext()
        return forked_rng([self.device])

    def replaying(self) -> LayerRecord:
        return LayerRecord(self.device, self.rng, self.stats, replay=True)

    @property
    def nbytes(self) -> int:
        """Bytes the record keeps: LayerNorm statistics and RNG states."""
        total = sum(mean.nbytes + std.nbytes for mean, std in self.stats or [])
        return total + sum(state.nbytes for state in self.rng or [])
