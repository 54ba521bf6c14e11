"""Sinkhorn settings stored as plain attributes of a transformers config (so they survive save/reload)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

DEFAULT_ITERATIONS = 3  # the paper's IMDb and ViT setting
BACKWARD_MODES = ("unrolled", "implicit")
STREAMING_MODES = ("auto", True, False)


@dataclass(frozen=True)
class SinkhornSettings:
    """``iterations``: normalisation steps, rows first (1 = SoftMax, odd = rows exact).
    ``tolerance``: optional early stop once column sums are within it of their target.
    ``backward``: "unrolled" (exact gradient of the K steps) or "implicit" (gradient at convergence).
    ``streaming``: True, False or "auto" (stream when the query or key length reaches ``streaming_threshold``):
    never hold the full score matrix, visit it in blocks of ``block_size`` queries (None: scores half the size of Q)."""

    iterations: int = DEFAULT_ITERATIONS
    tolerance: float | None = None
    backward: str = "unrolled"
    streaming: bool | str = "auto"
    streaming_threshold: int = 1024
    block_size: int | None = None

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
        if self.backward not in BACKWARD_MODES:
            raise ValueError(f"sinkhorn_backward must be one of {BACKWARD_MODES}, got {self.backward!r}")
        if not (isinstance(self.streaming, bool) or self.streaming == "auto"):
            raise ValueError(f"sinkhorn_streaming must be one of {STREAMING_MODES}, got {self.streaming!r}")
        for name in ("streaming_threshold", "block_size"):
            value = getattr(self, name)
            if (value is not None or name == "streaming_threshold") and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                allowed = "an int >= 1" if name == "streaming_threshold" else "None or an int >= 1"
                raise ValueError(f"sinkhorn_{name} must be {allowed}, got {value!r}")

    @classmethod
    def from_config(cls, config: Any) -> SinkhornSettings:
        """Read ``sinkhorn_*`` attributes of ``config``; missing ones take their defaults."""
        return cls(**{field.name: getattr(config, f"sinkhorn_{field.name}", field.default) for field in fields(cls)})

    def to_config(self, config: Any) -> None:
        """Write these settings onto ``config`` as ``sinkhorn_*`` attributes."""
        for name, value in asdict(self).items():
            setattr(config, f"sinkhorn_{name}", value)
