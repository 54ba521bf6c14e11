"""Adjoint-memory residual stacks: backward passes that rebuild layer inputs instead of storing them.

Public entry points: :func:`enable_adjoint`, :func:`disable_adjoint`, :func:`probe_adjoint`.
"""

from .api import DEFAULT_TOLERANCE, SCALE_ATTRIBUTE, disable_adjoint, enable_adjoint, probe_adjoint
from .attach import FORWARD_CHANGING_SCHEMES, SCHEMES, AdjointStack, adjoint_stacks
from .auto import AutoChoice
from .layer_views import ADJOINT_FAMILIES, Sublayer, find_stacks
from .probe import AdjointProbe

__all__ = [
    "ADJOINT_FAMILIES",
    "DEFAULT_TOLERANCE",
    "FORWARD_CHANGING_SCHEMES",
    "SCALE_ATTRIBUTE",
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
