"""Build the model a script fine-tunes: pretrained or from a config, with its attention, adjoint and LoRA."""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import AutoConfig, PreTrainedConfig

from ..attention import register
from ..user_errors import UsageError
from .arguments import ModelArguments
from .lora import apply_lora


def load_config(model_args: ModelArguments, **config_kwargs: Any) -> PreTrainedConfig:
    """The model's config (pretrained, or a fresh one of ``--model_type``), then ``--config_overrides``.

    ``config_kwargs`` (num_labels, id2label, ...) are set before the overrides, so the overrides win.
    """
    if model_args.model_name_or_path is not None:
        config = AutoConfig.from_pretrained(model_args.config_name or model_args.model_name_or_path, **config_kwargs)
    elif model_args.config_name is not None:
        config = AutoConfig.from_pretrained(model_args.config_name, **config_kwargs)
    else:
        config = AutoConfig.for_model(model_args.model_type, **config_kwargs)
    if model_args.config_overrides:
        unknown = [
            item.split("=", 1)[0]
            for item in model_args.config_overrides.split(",")
            if not hasattr(config, item.split("=", 1)[0].strip())
        ]
        if unknown:
            raise UsageError(
                f"--config_overrides names attributes {unknown} that a {config.model_type} config does not have"
            )
        config.update_from_string(model_args.config_overrides)
        if model_args.model_name_or_path is None and model_args.config_name is None:
            # a fresh config is rebuilt with the overrides as arguments: fields derived at construction follow
            # them (ModernBERT's layer_types has one entry per layer, computed from num_hidden_layers)
            overrides = {item.split("=", 1)[0].strip() for item in model_args.config_overrides.split(",")}
            config = AutoConfig.for_model(
                model_args.model_type, **config_kwargs, **{name: getattr(config, name) for name in overrides}
            )
    return config


def build_model(
    model_args: ModelArguments, config: PreTrainedConfig, auto_class: Any, **load_kwargs: Any
) -> tuple[nn.Module, tuple[str, ...] | None]:
    """Instantiate ``auto_class`` (e.g. ``AutoModelForSequenceClassification``) with the requested attention,
    adjoint scheme and LoRA adapters. Returns the model and the LoRA target modules (None without LoRA)."""
    if model_args.attn_implementation == "sinkhorn":
        register()  # idempotent (importing sinkhorn_hf registered it): the dependency stated, not assumed

        model_args.sinkhorn_settings.to_config(config)
    if model_args.model_name_or_path is not None:
        model = auto_class.from_pretrained(
            model_args.model_name_or_path,
            config=config,
            attn_implementation=model_args.attn_implementation,
            **load_kwargs,
        )
    else:
        model = auto_class.from_config(config, attn_implementation=model_args.attn_implementation)
    if model_args.adjoint != "off":
        from ..adjoint import enable_adjoint

        enable_adjoint(
            model,
            scheme=model_args.adjoint,
            tolerance=model_args.adjoint_tolerance,
            probe_every=model_args.adjoint_probe_every,
            allow_inexact=model_args.adjoint_allow_inexact,
        )
    if model_args.lora_r is None:
        return model, None
    return apply_lora(
        model,
        r=model_args.lora_r,
        alpha=model_args.lora_alpha,
        dropout=model_args.lora_dropout,
        target_modules=model_args.lora_targets,
    )
