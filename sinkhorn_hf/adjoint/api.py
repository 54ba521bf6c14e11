"""The public face of the adjoint: :func:`enable_adjoint`, :func:`disable_adjoint`, :func:`probe_adjoint`,
:func:`describe_adjoint`, :func:`auto_choices` / :func:`restore_auto_choices` for resumed training, and
:func:`check_adjoint_under_fsdp` for trainers that shard the model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .. import compat
from ..families import UnsupportedModelError
from .attach import AUTO, OFF, SCHEMES, AdjointStack, adjoint_stacks
from .layer_views import find_stacks
from .probe import AdjointProbe, compare_with_backprop
from .rules import BASE_RULE

DEFAULT_TOLERANCE = 1e-2
DEFAULT_REFERENCE_ROWS = 2  # sequences of a batch the self-checks and auto's probe run on
SCALE_ATTRIBUTE = "adjoint_residual_scale"  # config attribute: a float or "1/L"
COUPLING_ATTRIBUTE = "adjoint_coupling"  # config attribute: λ of a model trained under scheme="reversible"
DEFAULT_COUPLING = 1.0  # rebuilt within 1e-3 up to depth 24 on MiniLM in float32 (docs/adjoint.md)


def _resolve_scale(spec: Any, n_layers: int) -> float:
    if spec is None:
        return 1.0
    if spec == "1/L":
        return 1.0 / n_layers
    if isinstance(spec, (int, float)) and not isinstance(spec, bool) and spec > 0:
        return float(spec)
    raise ValueError(f"residual_scale must be a positive number or '1/L', got {spec!r}.")


def enable_adjoint(
    model: nn.Module,
    scheme: str = AUTO,
    tolerance: float = DEFAULT_TOLERANCE,
    *,
    probe_every: int | None = None,
    residual_scale: float | str | None = None,
    momentum: float = 0.9,
    allow_inexact: bool = False,
    reference_rows: int | None = DEFAULT_REFERENCE_ROWS,
    coupling: float | None = None,
) -> list[AdjointStack]:
    """Train ``model``'s residual layer stack(s) with memory-saving backward passes.

    Schemes: ``"euler"`` rebuilds each layer input by the reverse step (the model's forward is unchanged);
    ``"heun"`` uses Heun's forward and reverse (changes the forward); ``"checkpoint"`` stores each layer input and
    recomputes (exact); ``"reversible"`` couples each layer with the previous layer's input, ``x' = L(x) + λ·p, p' =
    x`` (λ = ``coupling``, default ``DEFAULT_COUPLING``; changes the forward, by less the smaller λ, while the
    rebuild error grows like (‖∂L‖/λ)^depth: see docs/adjoint.md), stored as ``config.adjoint_coupling`` so that
    ``from_pretrained`` rebuilds the coupled model; ``"momentum"`` makes the stack exactly invertible with momentum
    residuals (changes the forward, to be fine-tuned); ``"auto"`` (Euler forward) probes the reconstruction on the
    first training batch (and every ``probe_every`` batches), stores an exact anchor at each layer whose rebuilt
    input would be off by more than ``tolerance`` (relative), rebuilds the rest, and logs the choice; ``"off"`` runs
    plain backprop.
    A scheme that rebuilds inputs checks itself (see :mod:`.guard`): at the first backward and every ``probe_every``
    passes, euler/heun/momentum compare each rebuilt layer input with the exact one and raise
    :class:`~.guard.InexactAdjointError` naming the layers whose error exceeds ``tolerance`` (with
    ``allow_inexact=True``: one warning, and training goes on with those gradients); a non-finite rebuilt input
    raises in any backward, under every rebuilding scheme (auto included). The comparison and auto's probe run on
    ``reference_rows`` sequences of the batch (the one with the smallest token, then evenly spaced; None: all), so
    that they cost no peak memory beyond the adjoint's own; non-finite values are caught in every sequence (what a
    slice can miss: see :mod:`.guard`).
    ``residual_scale`` multiplies every residual branch (``"1/L"``: one over the stack depth, for ODE-like
    models); it is stored as ``config.adjoint_residual_scale`` (None: read it from there, default 1), survives
    ``save_pretrained``, and a model built from such a config (``from_pretrained``, ``from_config``) runs with it.
    Under FSDP (1 or 2) every scheme but ``"auto"`` works (see :func:`check_adjoint_under_fsdp`); enable it on the
    model before FSDP shards it.
    Returns the attached stacks (their ``anchors``, ``choice`` and :meth:`~.attach.AdjointStack.describe`).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown adjoint scheme {scheme!r}; choose one of {', '.join(SCHEMES)}.")
    if not isinstance(tolerance, (int, float)) or isinstance(tolerance, bool) or not tolerance > 0:
        raise ValueError(f"tolerance must be a positive number (relative error), got {tolerance!r}.")
    if probe_every is not None and (not isinstance(probe_every, int) or probe_every < 1):
        raise ValueError(f"probe_every must be None or an integer ≥ 1, got {probe_every!r}.")
    if not 0.0 < momentum < 1.0:
        raise ValueError(f"momentum must lie in (0, 1) (0 cannot be inverted), got {momentum!r}.")
    if not isinstance(allow_inexact, bool):
        raise ValueError(f"allow_inexact must be True or False, got {allow_inexact!r}.")
    if reference_rows is not None and (
        not isinstance(reference_rows, int) or isinstance(reference_rows, bool) or reference_rows < 1
    ):
        raise ValueError(
            f"reference_rows must be None (the whole batch) or an integer ≥ 1 (sequences of the batch the "
            f"self-check compares), got {reference_rows!r}."
        )
    config = getattr(model, "config", None)
    coupling = _resolve_coupling(scheme, coupling, getattr(config, COUPLING_ATTRIBUTE, None))
    if fsdp_in_use(model):
        _refuse_under_fsdp(scheme)
    if scheme != OFF and _sharded(model):
        raise ValueError(
            "enable_adjoint got a model that FSDP has already sharded; enable the adjoint before sharding (before "
            "accelerator.prepare or fully_shard): its stacks are found on the plain model, and they keep working "
            "once FSDP wraps the layers."
        )
    if residual_scale is not None:
        _resolve_scale(residual_scale, 1)
    spec = residual_scale if residual_scale is not None else getattr(config, SCALE_ATTRIBUTE, None)
    _remove_stacks(model)
    if scheme == OFF and spec in (None, 1, 1.0) and coupling is None:
        if config is not None and residual_scale is not None:
            setattr(config, SCALE_ATTRIBUTE, residual_scale)
        return []
    stacks = find_stacks(model)
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise UnsupportedModelError("the adjoint supports bidirectional encoders only (config.is_decoder is set).")
    flag = (
        "is_activation_checkpointing" if hasattr(model, "is_activation_checkpointing") else "is_gradient_checkpointing"
    )
    if getattr(model, flag, False):
        raise ValueError(
            "gradient checkpointing is enabled on this model; the adjoint replaces it: call "
            "model.gradient_checkpointing_disable() first (scheme='checkpoint' gives the same exact recomputation)."
        )
    if residual_scale is not None:
        setattr(config, SCALE_ATTRIBUTE, residual_scale)
    if coupling is not None and config is not None:
        setattr(config, COUPLING_ATTRIBUTE, coupling)
    return [
        AdjointStack(
            s,
            scheme,
            float(tolerance),
            probe_every,
            _resolve_scale(spec, len(s.positions)),
            momentum,
            allow_inexact,
            reference_rows,
            coupling,
        )
        for s in stacks
    ]


def _resolve_coupling(scheme: str, requested: Any, stored: Any) -> float | None:
    """λ of the reversible coupling the stacks run (None: no coupling): the requested one under ``"reversible"``
    (else the stored one, else the default); under ``"off"`` the stored one, so that a coupled model keeps its
    function. Any other scheme on a coupled model is refused: it would run a different function."""
    if requested is not None and (
        scheme != "reversible" or not isinstance(requested, (int, float)) or isinstance(requested, bool)
    ):
        raise ValueError(f"coupling applies to scheme='reversible' only and must be a number, got {requested!r}.")
    if scheme == "reversible":
        value = requested if requested is not None else stored if stored is not None else DEFAULT_COUPLING
        if not 0.0 < value <= 1.0:
            raise ValueError(f"coupling must lie in (0, 1] (the reverse divides by it), got {value!r}.")
        return float(value)
    if stored is not None and scheme != OFF:
        raise ValueError(
            f"this model runs a reversible coupling (config.{COUPLING_ATTRIBUTE} = {stored}): its function needs it, "
            f"so scheme {scheme!r} would train a different model. Use scheme='reversible' (rebuilds inputs) or "
            "'off' (plain backprop of the coupled forward)."
        )
    return None if stored is None else float(stored)


def _sharded(model: nn.Module) -> bool:
    """Whether a module of ``model`` is wrapped by FSDP1 or FSDP2."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules())


def fsdp_in_use(model: nn.Module) -> bool:
    """Whether FSDP shards ``model`` or will: a module inside it wrapped by FSDP1 or FSDP2, an initialized
    accelerate state that uses FSDP, or the environment ``accelerate launch --use_fsdp`` sets."""
    from accelerate.state import AcceleratorState, is_initialized
    from accelerate.utils import DistributedType, parse_flag_from_env

    if _sharded(model):
        return True
    if is_initialized() and AcceleratorState().distributed_type == DistributedType.FSDP:
        return True
    return parse_flag_from_env("ACCELERATE_USE_FSDP")


def check_adjoint_under_fsdp(model: nn.Module, sharded: bool | None = None) -> None:
    """Raise ``ValueError`` if an adjoint stack of ``model`` cannot run under FSDP, when FSDP is used (``sharded``;
    None: as :func:`fsdp_in_use` finds). FSDP (1 and 2) gathers a wrapped layer's parameters around each of its
    calls, in forward and in backward: the schemes that run one layer at a time work, ``"auto"`` (whose probe
    evaluates every layer at once) is refused. For a trainer to call before it shards a model on which the
    adjoint was enabled earlier (enable_adjoint checks by itself)."""
    if sharded if sharded is not None else fsdp_in_use(model):
        for stack in adjoint_stacks(model):
            _refuse_under_fsdp(stack.scheme)


def _refuse_under_fsdp(scheme: str) -> None:
    if scheme == AUTO:
        raise ValueError(
            "adjoint scheme 'auto' does not run under FSDP: its probe evaluates every layer at once, while FSDP "
            "gathers the parameters of only the layer that runs. Under FSDP choose 'euler', 'heun', 'momentum' or "
            "'checkpoint' (each runs one layer at a time), or keep 'auto' and train with DDP "
            "(`accelerate launch --multi_gpu`)."
        )


def disable_adjoint(model: nn.Module) -> None:
    """Give the layers back their own forward (plain backprop).

    A model with a residual scale other than 1, or a reversible coupling, keeps it (its function depends on it):
    its layers stay wrapped with scheme ``"off"``.
    """
    _remove_stacks(model)
    config = getattr(model, "config", None)
    spec, coupling = getattr(config, SCALE_ATTRIBUTE, None), getattr(config, COUPLING_ATTRIBUTE, None)
    if spec not in (None, 1, 1.0) or coupling is not None:
        for s in find_stacks(model):
            scale = _resolve_scale(spec, len(s.positions))
            AdjointStack(s, OFF, DEFAULT_TOLERANCE, None, scale, 0.9, coupling=coupling)


def _remove_stacks(model: nn.Module) -> None:
    for stack in adjoint_stacks(model):
        stack.remove()


def apply_stored_residual_scale(model: nn.Module) -> None:
    """Run ``model`` with the residual scale its config stores (as :func:`disable_adjoint` leaves it), unless it
    has none (or 1). Called at the end of every transformers model's ``post_init`` (see
    :func:`install_residual_scale_at_load`), so that a saved scaled model reloads as it was; a head model's
    call replaces the stacks its encoder's own ``post_init`` attached (same function, named from the top)."""
    config = getattr(model, "config", None)
    if getattr(config, SCALE_ATTRIBUTE, None) not in (None, 1, 1.0) or getattr(config, COUPLING_ATTRIBUTE, None):
        disable_adjoint(model)


def install_residual_scale_at_load() -> None:
    """Make every transformers model apply a stored ``adjoint_residual_scale`` when built. Idempotent."""
    compat.patch_post_init(apply_stored_residual_scale)


def describe_adjoint(model: nn.Module) -> str:
    """One line on the adjoint of ``model``: per stack, its scheme and what it measured or chose (auto's anchors,
    errors and memory; a rebuilding scheme's last self-check), e.g. for a trainer to print once after its first
    step; ``"adjoint off"`` without stacks."""
    return " | ".join(stack.describe() for stack in adjoint_stacks(model)) or "adjoint off"


def auto_choices(model: nn.Module) -> dict[str, Any]:
    """What the auto policy chose on each stack of ``model``, JSON-serialisable, to store in a checkpoint:
    ``{stack name: {"passes": n, "choice": {...}}}``. Stacks that have not chosen yet are left out."""
    states = {stack.stack.name: stack.auto_state() for stack in adjoint_stacks(model)}
    return {name: state for name, state in states.items() if state is not None}


def restore_auto_choices(model: nn.Module, state: Mapping[str, Any]) -> None:
    """Give ``model``'s auto stacks the anchors :func:`auto_choices` returned, so that a resumed run does not
    probe again and keeps the uninterrupted run's choice (``probe_every`` goes on counting from it)."""
    stacks = {stack.stack.name: stack for stack in adjoint_stacks(model)}
    if not isinstance(state, Mapping):
        raise ValueError(f"restore_auto_choices expects the dict auto_choices returned, got {state!r}.")
    for name, entry in state.items():
        if name not in stacks:
            raise ValueError(
                f"restore_auto_choices: the model has no adjoint stack {name!r} (it has {sorted(stacks) or 'none'}); "
                "call enable_adjoint(model, 'auto') first, on the model the choice was saved from."
            )
        stacks[name].restore_auto_state(entry)


def probe_adjoint(
    model: nn.Module, batch: Mapping[str, Any], *, scheme: str | None = None, tolerance: float | None = None
) -> AdjointProbe:
    """Reconstruction errors per layer and gradient agreement with exact backprop, on ``batch``.

    Uses the scheme the model is under (``scheme`` overrides it for this probe; a model without the adjoint is
    probed under ``"euler"``). The model's train/eval mode is respected: in train mode both gradient runs
    see the same dropout masks. Parameter ``.grad`` fields are not touched; the global RNG is left as it was.
    Costs three forward and two backward passes.
    """
    previous = adjoint_stacks(model)
    restore = dict(previous[0].settings) if previous else None
    chosen_scheme = scheme or (restore["scheme"] if restore else BASE_RULE)
    chosen_tolerance = tolerance if tolerance is not None else (restore["tolerance"] if restore else DEFAULT_TOLERANCE)
    if chosen_scheme == OFF:
        raise ValueError("probe_adjoint needs an adjoint scheme; the model's scheme is 'off'.")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("probe_adjoint needs trainable parameters; all of the model's are frozen.")
    temporary = scheme is not None or tolerance is not None or not previous
    if temporary:
        enable_adjoint(model, chosen_scheme, chosen_tolerance)
    try:
        return compare_with_backprop(model, batch, adjoint_stacks(model), chosen_scheme)
    finally:
        if temporary:
            disable_adjoint(model)
            if restore is not None:
                enable_adjoint(model, restore.pop("scheme"), **restore)
