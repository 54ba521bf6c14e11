"""Adjoint-memory residual stacks: backward passes that rebuild layer inputs instead of storing them.

Public entry points: :func:`enable_adjoint`, :func:`disable_adjoint`, :func:`probe_adjoint`.
"""

from .blocks import ADJOINT_FAMILIES, Sublayer, find_stacks
from .controller import (
    DEFAULT_TOLERANCE,
    SCHEMES,
    AdjointStack,
    AutoChoice,
    adjoint_stacks,
    disable_adjoint,
    enable_adjoint,
)
from .report import AdjointProbe, probe_adjoint

__all__ = [
    "ADJOINT_FAMILIES",
    "DEFAULT_TOLERANCE",
    "SCHEMES",
    "AdjointProbe",
    "AdjointStack",
    "AutoChoice",
    "Sublayer",
    "adjoint_stacks",
    "disable_adjoint",
    "enable_adjoint",
    "find_stacks",
    "probe_adjoint",
]
