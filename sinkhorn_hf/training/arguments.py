"""Command-line arguments shared by the fine-tuning scripts, as dataclasses for ``transformers.HfArgumentParser``.

Flag names follow the Hugging Face example scripts where one exists (``--model_name_or_path``,
``--per_device_train_batch_size``, ``--checkpointing_steps``, ...).
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any, Literal

from ..adjoint import DEFAULT_TOLERANCE
from ..attention.settings import SinkhornSettings

AttnImplementation = Literal["eager", "sdpa", "sinkhorn"]
AdjointScheme = Literal["off", "auto", "euler", "heun", "checkpoint", "momentum"]


# Help for every SinkhornSettings field (tests/training/test_arguments.py fails for a field missing here).
SINKHORN_HELP = {
    "iterations": "Sinkhorn normalisation steps K, rows first (1 = SoftMax); used with sinkhorn attention",
    "tolerance": "stop early once column sums are within this of their target (none: always run K steps)",
    "backward": "unrolled (exact gradient of the K steps) or implicit (gradient at convergence)",
    "streaming": "true, false or auto: visit the scores in query blocks, never holding the full matrix",
    "streaming_threshold": "with --sinkhorn_streaming auto: stream once the query or key length reaches this",
    "block_size": "queries per streaming block (none: scores half the size of Q)",
    "backend": "auto (fused Triton kernels on CUDA where they support the call, else PyTorch), triton or torch",
}


def require_at_least_one(**values: int | None) -> None:
    """Raise ``--name must be >= 1`` for the first given (not None) value below 1."""
    for name, value in values.items():
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")


def _parse_setting(text: str, hint: Any) -> Any:
    """A command-line string as the first type of ``hint`` that reads it; unreadable text is returned as is so
    that :class:`SinkhornSettings` rejects it with its own message."""
    for option in typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,):
        if option is type(None) and text.lower() in ("none", "null"):
            return None
        if option is bool and text.lower() in ("true", "false"):
            return text.lower() == "true"
        if option in (int, float):
            try:
                return option(text)
            except ValueError:
                continue
        if option is str:
            return text
    return text


def _sinkhorn_post_init(self) -> None:
    hints = typing.get_type_hints(SinkhornSettings)
    values = {}
    for setting in fields(SinkhornSettings):
        value = getattr(self, f"sinkhorn_{setting.name}")
        values[setting.name] = _parse_setting(value, hints[setting.name]) if isinstance(value, str) else value
    self.sinkhorn_settings = SinkhornSettings(**values)  # its checks and messages, as everywhere else


# One ``--sinkhorn_<name>`` flag per SinkhornSettings field (strings from the command line are read by the
# field's type, values given in Python pass through), validated by SinkhornSettings itself.
SinkhornArguments = make_dataclass(
    "SinkhornArguments",
    [
        (
            f"sinkhorn_{setting.name}",
            str | None,
            field(
                default=setting.default,
                metadata={
                    "help": f"{SINKHORN_HELP.get(setting.name, 'see SinkhornSettings')} "
                    f"(SinkhornSettings.{setting.name})"
                },
            ),
        )
        for setting in fields(SinkhornSettings)
    ],
    namespace={"__post_init__": _sinkhorn_post_init, "__doc__": "Every SinkhornSettings field as a flag."},
)


@dataclass
class ModelArguments(SinkhornArguments):
    """Which model to fine-tune, its attention, adjoint scheme and LoRA adapters."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "local path or Hub name of a pretrained checkpoint"}
    )
    model_type: str | None = field(
        default=None,
        metadata={"help": "build a randomly initialised model of this type (e.g. vit) instead of loading weights"},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": 'config attributes to override, e.g. "hidden_size=192,num_hidden_layers=6,patch_size=4"'},
    )
    config_name: str | None = field(default=None, metadata={"help": "config to use instead of the model's own"})
    tokenizer_name: str | None = field(default=None, metadata={"help": "tokenizer path or name (text models)"})
    image_processor_name: str | None = field(
        default=None, metadata={"help": "image processor path or name (image models)"}
    )
    attn_implementation: AttnImplementation = field(
        default="sdpa", metadata={"help": "attention: eager or sdpa (SoftMax), or sinkhorn (doubly stochastic)"}
    )
    adjoint: AdjointScheme = field(
        default="off", metadata={"help": "adjoint (memory-free) residual stack scheme; off keeps plain backprop"}
    )
    adjoint_tolerance: float = field(
        default=DEFAULT_TOLERANCE,
        metadata={"help": "largest relative error of a rebuilt layer input the adjoint accepts (auto: anchors beyond)"},
    )
    adjoint_probe_every: int | None = field(
        default=None, metadata={"help": "re-check the adjoint's rebuild (auto: re-choose anchors) every N passes"}
    )
    adjoint_allow_inexact: bool = field(
        default=False,
        metadata={"help": "train on when euler/heun/momentum rebuild inputs beyond the tolerance (one warning)"},
    )
    lora_r: int | None = field(default=None, metadata={"help": "LoRA rank; unset trains all weights"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling alpha"})
    lora_dropout: float = field(default=0.1, metadata={"help": "dropout on the LoRA branch"})
    lora_target_modules: str | None = field(
        default=None,
        metadata={
            "help": "comma-separated module names for LoRA (default per family: BERT query,value; ViT q_proj,v_proj)"
        },
    )

    def __post_init__(self) -> None:
        if (self.model_name_or_path is None) == (self.model_type is None):
            raise ValueError(
                "give exactly one of --model_name_or_path (load pretrained weights) or --model_type "
                "(build a random model from a config), got "
                f"model_name_or_path={self.model_name_or_path!r}, model_type={self.model_type!r}"
            )
        super().__post_init__()
        if self.lora_r is not None and self.lora_r < 1:
            raise ValueError(f"--lora_r must be >= 1 (leave it unset to train all weights), got {self.lora_r}")
        if not self.adjoint_tolerance > 0:
            raise ValueError(f"--adjoint_tolerance must be a positive number, got {self.adjoint_tolerance}")
        require_at_least_one(adjoint_probe_every=self.adjoint_probe_every)

    @property
    def lora_targets(self) -> tuple[str, ...] | None:
        if self.lora_target_modules is None:
            return None
        return tuple(name.strip() for name in self.lora_target_modules.split(",") if name.strip())


@dataclass
class TrainerArguments:
    """The training loop: optimisation, checkpoints, evaluation, early stopping, logging."""

    output_dir: str = field(metadata={"help": "where checkpoints, the final model and results.json go"})
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 32
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    num_train_epochs: int = 3
    max_train_steps: int | None = field(
        default=None, metadata={"help": "total optimizer steps; overrides --num_train_epochs"}
    )
    gradient_accumulation_steps: int = 1
    lr_scheduler_type: str = field(
        default="linear", metadata={"help": "transformers scheduler name: linear, cosine, constant_with_warmup, ..."}
    )
    num_warmup_steps: int = 0
    warmup_ratio: float = field(default=0.0, metadata={"help": "warmup as a fraction of the total steps"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm; 0 disables it"})
    mixed_precision: Literal["no", "fp16", "bf16"] | None = field(
        default=None, metadata={"help": "no, fp16 or bf16; default: what `accelerate config`/launch says"}
    )
    seed: int = 42
    checkpointing_steps: str | None = field(
        default=None,
        metadata={"help": "save the full training state every N optimizer steps, or 'epoch'; always at the end"},
    )
    save_total_limit: int | None = field(
        default=2, metadata={"help": "keep at most this many checkpoints (oldest deleted first); unset keeps all"}
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "a checkpoint folder, or 'latest' for the newest one under --output_dir (none yet: start at step 0)"
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "start a new run in an --output_dir holding an earlier run's checkpoints: they, its results and "
            "logs are moved into previous_run-<time>/ there (nothing is deleted)"
        },
    )
    eval_steps: int | None = field(
        default=None, metadata={"help": "evaluate every N optimizer steps; unset: at the end of every epoch"}
    )
    logging_steps: int = 50
    track_attention_marginals: int | None = field(
        default=None,
        metadata={
            "help": "every N optimizer steps, on one evaluation batch: per layer, the std of SoftMax column sums "
            "over valid tokens (and Sinkhorn's column error), logged and written to results.json with a picture"
        },
    )
    with_tracking: bool = field(
        default=False,
        metadata={"help": "log to accelerate trackers: --report_to, or tensorboard under OUTPUT_DIR/runs"},
    )
    report_to: str | None = field(
        default=None,
        metadata={
            "help": "accelerate tracker(s), comma-separated (tensorboard, wandb, ...); naming one turns tracking on, "
            "'none' turns it off"
        },
    )
    early_stopping_patience: int | None = field(
        default=None, metadata={"help": "stop after this many evaluations without improvement"}
    )
    early_stopping_threshold: float = 0.0
    metric_for_best_model: str | None = field(
        default=None, metadata={"help": "metric watched by early stopping (default: the task's main metric)"}
    )
    greater_is_better: bool = True
    dataloader_num_workers: int = 0
    push_to_hub: bool = field(
        default=False, metadata={"help": "write a model card and upload --output_dir to --hub_model_id at the end"}
    )
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repository id, e.g. user/model-name"})
    hub_private_repo: bool = False

    def __post_init__(self) -> None:
        if self.overwrite_output_dir and self.resume_from_checkpoint:
            raise ValueError(
                "give --resume_from_checkpoint (continue the run in --output_dir) or --overwrite_output_dir (start "
                "anew, moving its checkpoints aside), not both"
            )
        # Asking for a tracker turns tracking on (as transformers' Trainer does); tracking alone means tensorboard.
        if self.report_to is not None and self.report_to.strip().lower() in ("", "none"):
            self.report_to, self.with_tracking = None, False
        elif self.report_to is not None:
            self.with_tracking = True
        elif self.with_tracking:
            self.report_to = "tensorboard"
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id (e.g. user/bert-sinkhorn-sst2)")
        if self.checkpointing_steps is not None and self.checkpointing_steps != "epoch":
            if not self.checkpointing_steps.isdigit() or int(self.checkpointing_steps) < 1:
                raise ValueError(
                    f"--checkpointing_steps must be a positive integer or 'epoch', got {self.checkpointing_steps!r}"
                )
        require_at_least_one(
            **{
                name: getattr(self, name)
                for name in (
                    "per_device_train_batch_size",
                    "per_device_eval_batch_size",
                    "gradient_accumulation_steps",
                    "num_train_epochs",
                    "logging_steps",
                    "max_train_steps",
                    "eval_steps",
                    "save_total_limit",
                    "early_stopping_patience",
                )  # fmt: skip
            }
        )
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_ratio and self.num_warmup_steps:
            raise ValueError("give --num_warmup_steps or --warmup_ratio, not both")

    @property
    def trackers(self) -> list[str] | None:
        """The accelerate trackers to log with (``log_with``), None without tracking."""
        return [name.strip() for name in self.report_to.split(",") if name.strip()] if self.with_tracking else None

    @property
    def checkpoint_every(self) -> int | None:
        """Steps between checkpoints (None: only per epoch or at the end)."""
        steps = self.checkpointing_steps
        return int(steps) if steps is not None and steps != "epoch" else None
