"""Every Sinkhorn option once, validated once: the settings persisted on a transformers config
(:class:`SinkhornSettings`), the conjugate-gradient settings of the implicit backward (:class:`ImplicitSolver`),
and what one call hands to a route (:class:`RouteOptions`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

DEFAULT_ITERATIONS = 3  # the paper's IMDb and ViT setting
BACKWARD_MODES = ("unrolled", "implicit")
STREAMING_MODES = ("auto", True, False)
BACKENDS = ("auto", "triton", "torch")


def check_count(name: str, value: Any, optional: bool = False, hint: str = "") -> None:
    """Refuse ``value`` unless it is an int >= 1 (or None when ``optional``); the message names ``name``."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "None or an int >= 1" if optional else "an int >= 1"
        raise ValueError(f"{name} must be {allowed}{hint}, got {value!r}")


def check_iterations(iterations: Any, name: str = "sinkhorn_iterations") -> None:
    """Refuse an iteration count K that is not an int >= 1."""
    check_count(name, iterations, hint=" (1 is SoftMax, 3 the paper's default)")


@dataclass(frozen=True)
class SinkhornSettings:
    """``iterations``: normalisation steps, rows first (1 = SoftMax, odd = rows exact).
    ``tolerance``: optional early stop once column sums are within it of their target.
    ``backward``: "unrolled" (exact gradient of the K steps) or "implicit" (gradient at convergence).
    ``streaming``: True, False or "auto" (stream when the query or key length reaches ``streaming_threshold``):
    never hold the full score matrix, visit it in blocks of ``block_size`` queries (None: scores half the size of Q).
    ``backend``: "auto" (the fused Triton kernels on CUDA where they support the call, else the PyTorch routes),
    "triton" (the kernels or an error saying why they cannot run) or "torch" (the PyTorch routes)."""

    iterations: int = DEFAULT_ITERATIONS
    tolerance: float | None = None
    backward: str = "unrolled"
    streaming: bool | str = "auto"
    streaming_threshold: int = 1024
    block_size: int | None = None
    backend: str = "auto"

    def __post_init__(self) -> None:
        check_iterations(self.iterations)
        if self.tolerance is not None and (
            isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float)) or not self.tolerance > 0
        ):
            raise ValueError(f"sinkhorn_tolerance must be None or a float > 0, got {self.tolerance!r}")
        if self.backward not in BACKWARD_MODES:
            raise ValueError(f"sinkhorn_backward must be one of {BACKWARD_MODES}, got {self.backward!r}")
        if not (isinstance(self.streaming, bool) or self.streaming == "auto"):
            raise ValueError(f"sinkhorn_streaming must be one of {STREAMING_MODES}, got {self.streaming!r}")
        check_count("sinkhorn_streaming_threshold", self.streaming_threshold)
        check_count("sinkhorn_block_size", self.block_size, optional=True)
        if self.backend not in BACKENDS:
            raise ValueError(f"sinkhorn_backend must be one of {BACKENDS}, got {self.backend!r}")

    @classmethod
    def from_config(cls, config: Any) -> SinkhornSettings:
        """Read ``sinkhorn_*`` attributes of ``config``; missing ones take their defaults.

        Called by every layer on every forward, so it only reads the attributes (a user may change them at any
        time) and returns the settings built and validated once for those values: no dataclass machinery runs
        per call, which also keeps ``torch.compile`` graphs whole.
        """
        values = tuple(getattr(config, attribute, default) for _, attribute, default in _CONFIG_FIELDS)
        try:
            key = tuple((type(value), value) for value in values)  # True == 1, but only one of them is valid
            cached = _FROM_CONFIG.get(key)
        except TypeError:  # an unhashable value (say a list): let validation name it
            key, cached = None, None
        if cached is None:
            cached = cls(**{name: value for (name, _, _), value in zip(_CONFIG_FIELDS, values, strict=True)})
            if key is not None:
                _FROM_CONFIG[key] = cached
        return cached

    def to_config(self, config: Any) -> None:
        """Write these settings onto ``config`` as ``sinkhorn_*`` attributes."""
        for name, value in asdict(self).items():
            setattr(config, f"sinkhorn_{name}", value)


# (field name, config attribute, default) of every SinkhornSettings field, and the settings built per distinct value
_CONFIG_FIELDS = tuple((field.name, f"sinkhorn_{field.name}", field.default) for field in fields(SinkhornSettings))
_FROM_CONFIG: dict[tuple, SinkhornSettings] = {}


@dataclass(frozen=True)
class ImplicitSolver:
    """Conjugate gradient settings: ``ridge`` added to the diagonal, stop when every system's residual is below
    ``tolerance`` times its right-hand side, or after ``max_iterations``."""

    ridge: float = 1e-6
    tolerance: float = 1e-6
    max_iterations: int = 100


@dataclass(frozen=True)
class RouteOptions:
    """What the dense and streaming Functions need beyond their tensors: the validated ``settings`` (iterations K,
    tolerance, backward mode), the score ``scale``, ``block_size`` queries per score block (None: dense, one
    block), the attention ``dropout`` probability, ``return_weights`` (dense only) and the implicit ``solver``."""

    settings: SinkhornSettings
    scale: float
    block_size: int | None = None
    dropout: float = 0.0
    return_weights: bool = False
    solver: ImplicitSolver = ImplicitSolver()
