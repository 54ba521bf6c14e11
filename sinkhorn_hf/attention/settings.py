"""Sinkhorn settings stored as plain attributes of a transformers config (so they survive save/reload)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

DEFAULT_ITERATIONS = 3  # the paper's IMDb and ViT setting


@dataclass(frozen=True)
class SinkhornSettings:
    """``iterations``: normalisation steps, rows first (1 = SoftMax, odd = rows exact).
    ``tolerance``: optional early stop once column sums are within it of their target."""

    iterations: int = DEFAULT_ITERATIONS
    tolerance: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(
                f"sinkhorn_iterations must be an int >= 1 (1 is SoftMax, 3 the paper's default), "
                f"got {self.iterations!r}"
            )
        if self.tolerance is not None and (
            isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float)) or not self.tolerance > 0
        ):
            raise ValueError(f"sinkhorn_tolerance must be None or a float > 0, got {self.tolerance!r}")

    @classmethod
    def from_config(cls, config: Any) -> SinkhornSettings:
        """Read ``sinkhorn_*`` attributes of ``config``; missing ones take their defaults."""
        return cls(
            iterations=getattr(config, "sinkhorn_iterations", DEFAULT_ITERATIONS),
            tolerance=getattr(config, "sinkhorn_tolerance", None),
        )

    def to_config(self, config: Any) -> None:
        """Write these settings onto ``config`` as ``sinkhorn_*`` attributes."""
        for name, value in asdict(self).items():
            setattr(config, f"sinkhorn_{name}", value)
