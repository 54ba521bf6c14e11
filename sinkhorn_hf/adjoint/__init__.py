"""Adjoint-memory residual stacks: backward passes that rebuild layer inputs instead of storing them.

Public entry points: :func:`enable_adjoint`, :func:`disable_adjoint`, :func:`probe_adjoint`,
:func:`describe_adjoint`, :func:`auto_choices`, :func:`restore_auto_choices`, and :func:`check_adjoint_under_fsdp`
(which schemes FSDP allows). Importing the package makes
transformers models built from a config that stores ``adjoint_residual_scale`` run with that scale.
"""

from .api import (
    DEFAULT_REFERENCE_ROWS,
    DEFAULT_TOLERANCE,
    SCALE_ATTRIBUTE,
    apply_stored_residual_scale,
    auto_choices,
    check_adjoint_under_fsdp,
    describe_adjoint,
    disable_adjoint,
    enable_adjoint,
    fsdp_in_use,
    install_residual_scale_at_load,
    probe_adjoint,
    restore_auto_choices,
)
from .attach import FORWARD_CHANGING_SCHEMES, SCHEMES, AdjointStack, adjoint_stacks
from .auto import AutoChoice
from .guard import InexactAdjointError
from .layer_views import ADJOINT_FAMILIES, Sublayer, find_stacks
from .probe import AdjointProbe

install_residual_scale_at_load()

__all__ = [
    "ADJOINT_FAMILIES",
    "DEFAULT_REFERENCE_ROWS",
    "DEFAULT_TOLERANCE",
    "FORWARD_CHANGING_SCHEMES",
    "SCALE_ATTRIBUTE",
    "SCHEMES",
    "AdjointProbe",
    "AdjointStack",
    "AutoChoice",
    "InexactAdjointError",
    "Sublayer",
    "adjoint_stacks",
    "apply_stored_residual_scale",
    "auto_choices",
    "check_adjoint_under_fsdp",
    "describe_adjoint",
    "disable_adjoint",
    "enable_adjoint",
    "fsdp_in_use",
    "find_stacks",
    "install_residual_scale_at_load",
    "probe_adjoint",
    "restore_auto_choices",
]
