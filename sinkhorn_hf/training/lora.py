"""LoRA adapters through peft, with target modules that exist in each supported family.

peft's own defaults do not cover ViT-family models in transformers 5.x (their attention projections are
``q_proj``/``v_proj``, and ``query``/``value`` matches nothing there), so the defaults live here.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..families import SUPPORTED_FAMILIES, TEXT_FAMILIES
from ..user_errors import UsageError

_TEXT_TARGETS = {"distilbert": ("q_lin", "v_lin")}
_VISION_TARGETS = ("q_proj", "v_proj")
# Freshly initialised heads that must train in full (and be saved with the adapter).
_HEADS = {"distilbert": ("pre_classifier", "classifier")}


def default_target_modules(model_type: str) -> tuple[str, ...]:
    """Query and value projections of ``model_type``'s attention (LoRA's usual choice)."""
    if model_type not in SUPPORTED_FAMILIES:
        raise UsageError(
            f"no default LoRA target modules for model_type={model_type!r}; pass --lora_target_modules "
            f"(supported families: {', '.join(SUPPORTED_FAMILIES)})"
        )
    if model_type in TEXT_FAMILIES:
        return _TEXT_TARGETS.get(model_type, ("query", "value"))
    return _VISION_TARGETS


def apply_lora(
    model: nn.Module,
    *,
    r: int,
    alpha: float,
    dropout: float,
    target_modules: Sequence[str] | None = None,
) -> tuple[nn.Module, tuple[str, ...]]:
    """Wrap ``model`` (a ``*ForSequenceClassification``/``*ForImageClassification``) in a peft LoRA model.

    Only the adapters and the classification head train. Returns the peft model and the target module names.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    model_type = model.config.model_type
    targets = tuple(target_modules) if target_modules else default_target_modules(model_type)
    linear_names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in targets if t not in linear_names]
    if missing:
        raise UsageError(
            f"--lora_target_modules {','.join(missing)} match no linear layer of this {model_type} model; "
            f"its linear layers are named: {', '.join(sorted(linear_names))}"
        )
    is_text = model_type in TEXT_FAMILIES
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS if is_text else None,
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(targets),
        modules_to_save=list(_HEADS.get(model_type, ("classifier",))),
    )
    return get_peft_model(model, config), targets
