"""``transformers.TrainerCallback`` s for users of ``transformers.Trainer``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch import Tensor
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .marginals import AttentionsFn, MarginalTracker, flat_metrics


class AttentionMarginalsCallback(TrainerCallback):
    """Track how far the model's SoftMax attention is from doubly stochastic on ``eval_batch`` (the model's
    forward arguments) before training and every ``every_n_steps`` optimizer steps (see :mod:`.marginals`).

    Each record goes into ``state.log_history`` as ``Trainer.log`` writes its entries (flat
    ``attention_marginals/layer_{l}/{name}`` values and ``step``, so ``trainer_state.json`` keeps them) and is
    rewritten to ``output_dir/attention_marginals.json``; the PNG of sorted column sums across training is drawn
    at train end. ``tracker`` exposes the records.
    """

    def __init__(
        self,
        eval_batch: Mapping[str, Tensor],
        every_n_steps: int,
        output_dir: str | Path,
        attentions_fn: AttentionsFn | None = None,
        title: str = "",
    ) -> None:
        self.eval_batch, self.every, self.output_dir = eval_batch, every_n_steps, Path(output_dir)
        self.attentions_fn, self.title = attentions_fn, title
        self.tracker: MarginalTracker | None = None
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an integer ≥ 1, got {every_n_steps!r}.")

    def _track(self, state: TrainerState, model) -> None:
        if self.tracker is None:
            self.tracker = MarginalTracker(model, self.eval_batch, self.every, self.attentions_fn, self.title)
        record = self.tracker.maybe_track(state.global_step)
        if record is not None and state.is_world_process_zero:
            state.log_history.append({**flat_metrics(record), "step": state.global_step})
            self.tracker.write(self.output_dir, plot=False)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ) -> None:
        self._track(state, model)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ) -> None:
        self._track(state, model)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ) -> None:
        if self.tracker is not None and self.tracker.records and state.is_world_process_zero:
            self.tracker.write(self.output_dir)
