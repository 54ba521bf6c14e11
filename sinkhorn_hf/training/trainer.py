"""The fine-tuning loop, on ``accelerate.Accelerator`` (one CPU, one GPU, or many through ``accelerate launch``).

Checkpoints hold everything a run needs to continue bit-for-bit: model, optimizer, scheduler and RNG states
(``Accelerator.save_state``) and the loop position (:class:`~.checkpoints.TrainerState`, JSON). The data order of
epoch e is a pure function of (seed, e), so a resumed run re-reads the epoch and skips the batches it had
already consumed. A resume refuses a checkpoint that is incomplete, damaged, or written under other settings;
a new run refuses a folder holding an earlier run's checkpoints (:func:`~.checkpoints.check_run_start`).

SIGTERM (a scheduler's notice before it kills) and a first SIGINT stop the run after the current optimizer step
with a checkpoint, one line saying so, and exit status :data:`EXIT_INTERRUPTED`; a second signal ends it at once.
The final model is written like a checkpoint: into a staging folder, then moved into place.

Nothing in a checkpoint is unpickled with code execution allowed: accelerate reads the optimizer, scheduler,
sampler and RNG files with ``torch.load(weights_only=True)`` and the model from safetensors; its pickled
custom-state slot (``custom_checkpoint_<i>.pkl``, read with ``weights_only=False``) is never used.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import RNG_STATE_NAME, DistributedType, ProjectConfiguration, load, parse_flag_from_env, set_seed
from peft import PeftModel
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import get_scheduler

from ..adjoint import adjoint_stacks, auto_choices, check_adjoint_under_fsdp, describe_adjoint, restore_auto_choices
from ..user_errors import UsageError, UserError
from .arguments import TrainerArguments
from .checkpoints import (
    TRAINER_STATE_FILE,
    CheckpointError,
    OutOfSpaceError,
    TrainerState,
    check_run_start,
    checkpoint_dir,
    finish_checkpoint,
    free_space,
    is_disk_full,
    move_earlier_run_aside,
    move_into_place,
    partial_dir,
    prune_checkpoints,
    remove_partial_checkpoints,
    resolve_checkpoint,
    set_aside_unusable,
    space_needed,
    verify_checkpoint,
)
from .marginals import MarginalTracker, flat_metrics
from .metrics import EvalOutput, MetricFn
from .output_lock import output_dir_lock
from .results import RunInfo, RunResults, peak_memory_mb

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"  # where a LoRA run keeps its adapter; the run directory itself holds the merged model
EXAMPLE_ID = "example_id"  # batch key naming the example a row belongs to; gathered, never fed to the model
FINAL_STAGING = ".partial-final-model"  # where the final model is written before it is moved into --output_dir
EXIT_INTERRUPTED = 75  # sysexits' EX_TEMPFAIL: stopped by SIGTERM/SIGINT with a checkpoint; run again to continue
# TrainerArguments that change what a run computes: a resume must have the same (the computed schedule is added).
RESUME_SETTINGS = (
    "learning_rate", "weight_decay", "lr_scheduler_type", "num_warmup_steps", "warmup_ratio", "max_grad_norm",
    "seed", "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "max_train_steps",
    "early_stopping_patience", "early_stopping_threshold", "metric_for_best_model", "greater_is_better",
)  # fmt: skip


class NonFiniteLossError(UserError, RuntimeError):
    """The training loss became inf or NaN (a failed run the user can fix: one line, exit status 1)."""


class TrainingInterrupted(SystemExit):
    """SIGTERM or SIGINT stopped the run after a step whose checkpoint was written (exit status 75)."""


def make_accelerator(args: TrainerArguments) -> Accelerator:
    """The run's Accelerator, seeded. Create it before building data and model (it sets up the processes).

    Processes started by torchrun / ``accelerate launch --multi_gpu`` on a machine without an accelerator
    join one CPU (gloo) process group instead of each training alone.
    """
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    launched = int(os.environ.get("LOCAL_RANK", -1)) != -1
    accelerator = Accelerator(
        cpu=launched and not has_accelerator,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.trackers,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=str(Path(args.output_dir) / "runs")
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    if accelerator.num_processes == 1 and "MASTER_ADDR" in os.environ and "LOCAL_RANK" not in os.environ:
        # `accelerate launch --cpu --num_processes N` (N > 1) starts one process and expects mpirun to start the rest.
        raise UsageError(
            "this process was launched for distributed training but runs alone: `accelerate launch --cpu "
            "--num_processes N` needs MPI (--mpirun_hostfile). For N CPU processes use `accelerate launch "
            "--multi_gpu --num_processes N` (no GPU needed) or `torchrun --nproc_per_node N`."
        )
    if parse_flag_from_env("ACCELERATE_USE_FSDP") and accelerator.distributed_type != DistributedType.FSDP:
        # accelerate turns FSDP on for accelerator devices only, and otherwise ignores the request.
        raise UsageError(
            "FSDP was asked for (`accelerate launch --use_fsdp`), but accelerate runs FSDP on GPUs (and other "
            f"accelerators) only: here it would train as {accelerator.distributed_type.value}, with every parameter "
            "whole on every process. On CPUs use `accelerate launch --multi_gpu --num_processes N` (DDP)."
        )
    set_seed(args.seed)
    return accelerator


def _leave_stop_signals_to_the_main_process(worker_id: int) -> None:
    """In a DataLoader worker: ignore SIGTERM and SIGINT, which a scheduler (Slurm) or a terminal sends to every
    process of the job, so that the main process can finish its step and checkpoint; the workers end with it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _optimizer(model: nn.Module, args: TrainerArguments) -> torch.optim.Optimizer:
    # No weight decay on biases and normalisation weights (the usual BERT recipe).
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.learning_rate)


class Trainer:
    """Fine-tunes a classification model and evaluates it with ``compute_metrics``.

    ``eval_datasets`` maps a key suffix to a dataset: ``""`` is the main evaluation set, its metrics keep
    their names; any other (e.g. ``"_mm"`` for MNLI mismatched) gets its suffix appended to the metric names.
    Batches are dicts for the model's forward with ``labels``, plus optionally ``example_id``.
    ``run_settings`` (e.g. :func:`~.run.run_settings`: model, attention, adjoint, LoRA, data) join the trainer's
    own settings in the fingerprint a resumed run must match.
    """

    def __init__(
        self,
        model: nn.Module,
        args: TrainerArguments,
        *,
        train_dataset: Dataset,
        eval_datasets: Mapping[str, Dataset],
        data_collator: Any,
        compute_metrics: MetricFn,
        accelerator: Accelerator | None = None,
        processing_class: Any = None,
        run_info: RunInfo,
        main_metric: str | None = None,
        run_settings: Mapping[str, Any] | None = None,
    ) -> None:
        if "" not in eval_datasets:
            raise ValueError('eval_datasets needs the main evaluation set under the key ""')
        self.args = args
        self.accelerator = accelerator or make_accelerator(args)
        self.train_dataset = train_dataset
        self.eval_datasets = dict(eval_datasets)
        self.data_collator = data_collator
        self.compute_metrics = compute_metrics
        self.processing_class = processing_class
        self.run_info = run_info
        self.metric_for_best_model = args.metric_for_best_model or main_metric
        if args.early_stopping_patience is not None and self.metric_for_best_model is None:
            raise ValueError("early stopping needs --metric_for_best_model")
        self.state = TrainerState()
        self._stop_signal: int | None = None  # the first SIGTERM/SIGINT received during train()
        self.model = model
        self.run_settings = dict(run_settings or {})
        # The adjoint's stacks are named by their path in the model enable_adjoint got: under LoRA, the base model.
        self.adjoint_model = model.get_base_model() if isinstance(model, PeftModel) else model
        self.adjoint_on = any(stack.scheme != "off" for stack in adjoint_stacks(self.adjoint_model))
        # Refuse here what would fail under FSDP (the adjoint is enabled before accelerate shards the model).
        fsdp = self.accelerator.distributed_type == DistributedType.FSDP
        check_adjoint_under_fsdp(self.adjoint_model, fsdp)
        if fsdp and args.track_attention_marginals:
            raise ValueError(
                "--track_attention_marginals runs the model in the main process alone, which FSDP's sharded "
                "parameters do not allow (the other processes must join every forward): train with DDP "
                "(`accelerate launch --multi_gpu`) to track marginals, or drop the flag."
            )

    # ---------------------------------------------------------------- set-up
    def _prepare(self) -> None:
        args, acc = self.args, self.accelerator
        # A private generator keeps data loading off the global RNG, which dropout uses.
        train_loader = DataLoader(
            self.train_dataset,
            batch_size=args.per_device_train_batch_size,
            shuffle=True,
            collate_fn=self.data_collator,
            num_workers=args.dataloader_num_workers,
            worker_init_fn=_leave_stop_signals_to_the_main_process,
            generator=torch.Generator().manual_seed(args.seed),
        )
        eval_loaders = {
            key: DataLoader(
                ds,
                batch_size=args.per_device_eval_batch_size,
                collate_fn=self.data_collator,
                num_workers=args.dataloader_num_workers,
                worker_init_fn=_leave_stop_signals_to_the_main_process,
                generator=torch.Generator().manual_seed(args.seed),
            )
            for key, ds in self.eval_datasets.items()
        }
        optimizer = _optimizer(self.model, args)
        self.model, self.optimizer, self.train_loader = acc.prepare(self.model, optimizer, train_loader)
        self.eval_loaders = {key: acc.prepare(loader) for key, loader in eval_loaders.items()}

        self.steps_per_epoch = math.ceil(len(self.train_loader) / args.gradient_accumulation_steps)
        self.max_steps = args.max_train_steps or args.num_train_epochs * self.steps_per_epoch
        self.num_epochs = math.ceil(self.max_steps / self.steps_per_epoch)
        warmup = args.num_warmup_steps or math.ceil(args.warmup_ratio * self.max_steps)
        # The prepared scheduler steps once per process at every optimizer step.
        scheduler = get_scheduler(
            args.lr_scheduler_type,
            optimizer=self.optimizer,
            num_warmup_steps=warmup * acc.num_processes,
            num_training_steps=self.max_steps * acc.num_processes,
        )
        self.scheduler = acc.prepare(scheduler)
        self.state.fingerprint = {
            **self.run_settings,
            **{name: getattr(args, name) for name in RESUME_SETTINGS},
            "mixed_precision": acc.mixed_precision,
            "max_steps": self.max_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "num_processes": acc.num_processes,
            "num_train_samples": len(self.train_dataset),
        }

    def _start(self) -> None:
        """Resume (``--resume_from_checkpoint``; ``latest`` with no complete checkpoint yet starts at step 0, saying
        so), or start anew, with ``--overwrite_output_dir`` after moving an earlier run's checkpoints aside."""
        args, acc = self.args, self.accelerator
        path = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir) if args.resume_from_checkpoint else None
        if path is not None:
            self._resume(path)
        elif args.resume_from_checkpoint:
            acc.print(
                f"--resume_from_checkpoint latest: no complete checkpoint in {args.output_dir} yet; starting at step 0"
            )
        elif args.overwrite_output_dir and acc.is_main_process and (aside := move_earlier_run_aside(args.output_dir)):
            acc.print(f"--overwrite_output_dir: moved the earlier run's checkpoints, results and logs to {aside}")
        self.state.run_id = self.state.run_id or uuid.uuid4().hex  # written by the main process alone
        acc.wait_for_everyone()

    def _resume(self, path: Path) -> None:
        acc = self.accelerator
        verify_checkpoint(path)
        saved = TrainerState.read(path / TRAINER_STATE_FILE)
        expected = json.loads(json.dumps(self.state.fingerprint))  # as it reads back from JSON
        names = [*expected, *(k for k in saved.fingerprint if k not in expected)]
        differences = {
            k: (saved.fingerprint.get(k), expected.get(k)) for k in names if saved.fingerprint.get(k) != expected.get(k)
        }
        if differences:
            raise CheckpointError(
                f"cannot resume from {path}: the run that wrote it differs in "
                + ", ".join(f"{k} (checkpoint {old!r}, now {new!r})" for k, (old, new) in differences.items())
            )
        # accelerate skips an unreadable RNG state with an info line; a resume must not go on with fresh RNG.
        rng_file = path / f"{RNG_STATE_NAME}_{acc.process_index}.pkl"
        try:
            load(rng_file)
        except Exception as error:
            raise CheckpointError(f"checkpoint {path}: cannot read {rng_file.name}: {error}") from None
        try:
            acc.load_state(str(path))
        except Exception as error:
            raise CheckpointError(f"cannot load checkpoint {path}: {type(error).__name__}: {error}") from error
        self.state = saved
        if saved.adjoint_auto_choices:
            restore_auto_choices(self.adjoint_model, saved.adjoint_auto_choices)
        acc.print(f"resumed from {path} at step {self.state.completed_steps}")

    # ---------------------------------------------------------------- evaluation
    def evaluate(self) -> dict[str, float]:
        """Metrics over every evaluation set, gathered from all processes without duplicates."""
        acc = self.accelerator
        self.model.eval()
        metrics: dict[str, float] = {}
        for suffix, loader in self.eval_loaders.items():
            logits, labels, ids = [], [], []
            for batch in tqdm(loader, desc=f"eval{suffix}", leave=False, disable=not self._show_bars()):
                example_ids = batch.pop(EXAMPLE_ID, None)
                with torch.no_grad():
                    out = self.model(**batch)
                logits.append(acc.gather_for_metrics(out.logits).float().cpu())
                labels.append(acc.gather_for_metrics(batch["labels"]).cpu())
                if example_ids is not None:
                    ids.append(acc.gather_for_metrics(example_ids).cpu())
            output = EvalOutput(
                torch.cat(logits).numpy(), torch.cat(labels).numpy(), torch.cat(ids).numpy() if ids else None
            )
            metrics.update({f"{k}{suffix}": v for k, v in self.compute_metrics(output).items()})
            metrics[f"num_samples{suffix}"] = len(np.unique(output.example_ids)) if ids else len(output.labels)
        self.model.train()
        return metrics

    def _evaluate_and_track(self) -> None:
        state = self.state
        self._pause_clock()
        metrics = self.evaluate()
        self._clock = time.perf_counter()
        state.last_eval_step = state.completed_steps
        state.history.append({"step": state.completed_steps, **metrics})
        self.accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=state.completed_steps)
        if self.accelerator.is_local_main_process:
            tqdm.write(f"step {state.completed_steps}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        if self.args.early_stopping_patience is None:
            return
        if self.metric_for_best_model not in metrics:
            raise ValueError(
                f"--metric_for_best_model {self.metric_for_best_model!r} is not among the metrics: {', '.join(metrics)}"
            )
        value = metrics[self.metric_for_best_model]
        sign = 1.0 if self.args.greater_is_better else -1.0
        if state.best_metric is None or sign * (value - state.best_metric) > self.args.early_stopping_threshold:
            state.best_metric, state.evals_without_improvement = value, 0
        else:
            state.evals_without_improvement += 1
            state.stopped_early = state.evals_without_improvement >= self.args.early_stopping_patience

    def _save_checkpoint(self) -> None:
        """Write the checkpoint of this step into a partial folder, then (main process) its trainer state and
        manifest, and rename it into place."""
        acc, state = self.accelerator, self.state
        self._pause_clock()
        state.last_checkpoint_step = state.completed_steps
        state.adjoint_auto_choices = auto_choices(self.adjoint_model) if self.adjoint_on else {}
        output_dir, keep = self.args.output_dir, self.args.save_total_limit
        final = checkpoint_dir(output_dir, state.completed_steps)
        if acc.is_main_process:
            remove_partial_checkpoints(output_dir)  # left by a run killed while writing one
            if aside := set_aside_unusable(final, state.run_id):  # e.g. one `latest` skipped as incomplete
                acc.print(f"moved {final}, which was not a complete checkpoint of this run, to {aside}")
        acc.wait_for_everyone()
        try:
            acc.save_state(str(partial_dir(final)))
            acc.wait_for_everyone()
            if acc.is_main_process:
                state.write(partial_dir(final) / TRAINER_STATE_FILE)
                finish_checkpoint(partial_dir(final), final)
        except Exception as error:
            if not is_disk_full(error, final.parent):
                raise
            if acc.is_main_process:
                shutil.rmtree(partial_dir(final), ignore_errors=True)  # ours, half-written: give its space back
            raise OutOfSpaceError(
                f"cannot write checkpoint {final}: no space left on device ({free_space(final)}); "
                f"{space_needed(output_dir, keep)}. Free space or lower --save_total_limit, then continue with "
                "--resume_from_checkpoint latest"
            ) from error
        if acc.is_main_process:
            prune_checkpoints(output_dir, keep, state.run_id)
        acc.wait_for_everyone()
        self._clock = time.perf_counter()

    def _check_loss(self, running_loss: torch.Tensor) -> None:
        """Stop, before anything is evaluated or saved, once the loss of this step is inf/NaN on any process."""
        if bool(torch.isfinite(self.accelerator.gather(running_loss)).all()):
            return
        state = self.state
        last = state.last_checkpoint_step
        kept = f"the last good checkpoint is {checkpoint_dir(self.args.output_dir, last)}" if last else "no checkpoint"
        raise NonFiniteLossError(
            f"the training loss is not finite (inf/NaN) at step {state.completed_steps} (epoch {state.epoch}); "
            f"training stopped without saving this step ({kept}). Lower --learning_rate or --max_grad_norm, "
            "check the data, or use --mixed_precision no."
        )

    # ---------------------------------------------------------------- training
    def train(self) -> RunResults:
        """Train to ``max_steps`` (or early stop), evaluate, save model and results.json; return the results.
        The output directory is locked for the run (:mod:`.output_lock`). Raises :class:`TrainingInterrupted`
        after SIGTERM or a first SIGINT (see the module docstring)."""
        args = self.args
        with output_dir_lock(args.output_dir, enabled=self.accelerator.is_main_process), self._stop_on_signals():
            check_run_start(args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
            return self._train()

    @contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """Within the block, SIGTERM and SIGINT (unless ignored) only record that the run should stop; a second
        one restores the earlier handler and raises the signal again, ending the run as it would have."""
        self._stop_signal = None
        previous = {}

        def record(signum: int, frame: Any) -> None:
            if self._stop_signal is None:
                self._stop_signal = signum
                return
            signal.signal(signum, previous[signum])
            signal.raise_signal(signum)

        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for signum in (signal.SIGTERM, signal.SIGINT):
                if signal.getsignal(signum) not in (signal.SIG_IGN, None):
                    previous[signum] = signal.signal(signum, record)
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _stop_requested(self) -> bool:
        """Whether a signal asked this or (a collective) any process to stop."""
        stop = self._stop_signal is not None
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([float(stop)], device=self.accelerator.device)
            stop = bool(self.accelerator.reduce(flag, "sum").item() > 0)
        return stop

    def _stop_for_signal(self, progress: tqdm) -> None:
        state, acc = self.state, self.accelerator
        if state.last_checkpoint_step != state.completed_steps:
            self._save_checkpoint()
        progress.close()
        received = signal.Signals(self._stop_signal).name if self._stop_signal else "a signal to another process"
        acc.print(
            f"{received}: stopped after step {state.completed_steps} of {self.max_steps} and wrote "
            f"{checkpoint_dir(self.args.output_dir, state.completed_steps)}; continue with "
            f"--resume_from_checkpoint latest (exit status {EXIT_INTERRUPTED})"
        )
        acc.end_training()
        raise TrainingInterrupted(EXIT_INTERRUPTED)

    def _train(self) -> RunResults:
        args, acc = self.args, self.accelerator
        self._prepare()
        self._start()
        state = self.state
        if args.with_tracking:
            hparams = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
            acc.init_trackers("sinkhorn_hf", config=hparams)
        every_ckpt, every_eval = args.checkpoint_every, args.eval_steps
        progress = tqdm(
            total=self.max_steps, initial=state.completed_steps, desc="train", disable=not self._show_bars()
        )
        running_loss, running_batches = torch.zeros((), device=acc.device), 0
        first_step = state.completed_steps + 1  # of this process: the adjoint's choice is printed after it
        self.marginals = self._marginal_tracker()
        self._clock = time.perf_counter()
        self.model.train()
        while state.epoch < self.num_epochs and not self._done():
            self.train_loader.set_epoch(state.epoch)
            loader = self.train_loader
            if state.batch_in_epoch:
                loader = acc.skip_first_batches(self.train_loader, state.batch_in_epoch)
            for batch in loader:
                with acc.accumulate(self.model):
                    batch.pop(EXAMPLE_ID, None)
                    loss = self.model(**batch).loss
                    acc.backward(loss)
                    if acc.sync_gradients and args.max_grad_norm > 0:
                        acc.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad()
                state.batch_in_epoch += 1
                state.samples_seen += len(batch["labels"]) * acc.num_processes
                running_loss += loss.detach()
                running_batches += 1
                if not acc.sync_gradients:
                    continue
                state.completed_steps += 1
                self._check_loss(running_loss)
                if self.adjoint_on and state.completed_steps == first_step:
                    acc.print(f"adjoint: {describe_adjoint(self.adjoint_model)}")
                progress.update(1)
                if self.marginals and (record := self.marginals.maybe_track(state.completed_steps)):
                    acc.log(flat_metrics(record), step=state.completed_steps)
                if state.completed_steps % args.logging_steps == 0:
                    self._log_loss(running_loss, running_batches, progress)
                    running_batches = 0
                if every_eval and state.completed_steps % every_eval == 0:
                    self._evaluate_and_track()
                if every_ckpt and state.completed_steps % every_ckpt == 0:
                    self._save_checkpoint()
                if self._stop_requested():
                    self._stop_for_signal(progress)
                if self._done():
                    break
            else:  # the epoch ran to its end
                state.epoch += 1
                state.batch_in_epoch = 0
                if every_eval is None:
                    self._evaluate_and_track()
                if args.checkpointing_steps == "epoch":
                    self._save_checkpoint()
        if running_batches:  # the steps after the last logging window: train_loss is never left unset
            self._log_loss(running_loss, running_batches, progress)
        progress.close()
        if state.last_eval_step != state.completed_steps:
            self._evaluate_and_track()
        self._pause_clock()
        if state.last_checkpoint_step != state.completed_steps:  # not the file system: ranks must agree
            self._save_checkpoint()
        results = self._finish()
        acc.end_training()
        return results

    def _show_bars(self) -> bool:
        """Progress bars on the main process when stderr is a terminal. In a log file (CI, ``| tee``) a bar's
        carriage returns would run into the evaluation lines: there each logging window prints a line instead."""
        return self.accelerator.is_local_main_process and sys.stderr.isatty()

    def _log_loss(self, running_loss: torch.Tensor, running_batches: int, progress: Any) -> None:
        """Log the mean loss over the ``running_batches`` batches summed in ``running_loss`` (all processes), keep it
        as ``train_loss`` and reset the sum."""
        mean_loss = self.accelerator.gather(running_loss).mean().item() / running_batches
        self.accelerator.log(
            {"train/loss": mean_loss, "train/learning_rate": self.scheduler.get_last_lr()[0]},
            step=self.state.completed_steps,
        )
        self.state.train_loss = mean_loss
        progress.set_postfix(loss=f"{mean_loss:.4f}")
        if self.accelerator.is_local_main_process and not self._show_bars():  # a log file: a line per window
            lr = self.scheduler.get_last_lr()[0]
            tqdm.write(
                f"step {self.state.completed_steps}/{self.max_steps}: loss={mean_loss:.4g}, learning_rate={lr:.3g}"
            )
        running_loss.zero_()

    def _marginal_tracker(self) -> MarginalTracker | None:
        """``--track_attention_marginals``: a tracker on the first evaluation batch, on the main process only; it
        measures the starting point at once (a resumed run tracks from its resume step)."""
        every = self.args.track_attention_marginals
        if not every or not self.accelerator.is_main_process:
            return None
        batch = next(iter(next(iter(self.eval_loaders.values()))))
        batch = {k: v for k, v in batch.items() if k not in ("labels", EXAMPLE_ID)}
        tracker = MarginalTracker(self.accelerator.unwrap_model(self.model), batch, every)
        tracker.maybe_track(self.state.completed_steps)
        return tracker

    def _done(self) -> bool:
        return self.state.completed_steps >= self.max_steps or self.state.stopped_early

    def _pause_clock(self) -> None:
        # Runtime counts training only, not evaluation or checkpoint writing.
        self.state.train_runtime_s += time.perf_counter() - self._clock
        self._clock = time.perf_counter()

    def _marginal_results(self) -> dict | None:
        if not self.marginals:
            return None
        paths = self.marginals.write(self.args.output_dir)
        return {"records": self.marginals.records, **{kind: str(path) for kind, path in paths.items()}}

    def _save_final_model(self) -> None:
        """Write the model and its processor into :data:`FINAL_STAGING`, then move them into ``--output_dir``
        (config.json last): a save that fails (a full disk) replaces nothing there."""
        acc = self.accelerator
        output_dir = Path(self.args.output_dir)
        staging = output_dir / FINAL_STAGING
        if acc.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)  # ours, left by a run killed while saving
            staging.mkdir()
        acc.wait_for_everyone()
        try:
            model = acc.unwrap_model(self.model)
            state_dict = None
            if isinstance(model, PeftModel):
                # The adapter alone cannot be loaded, carded or pushed as a model: keep it in adapter/ and save the
                # merged weights at the top, so the run directory loads with from_pretrained like any other run.
                model.save_pretrained(
                    staging / ADAPTER_DIR, is_main_process=acc.is_main_process, save_function=acc.save
                )
                model = model.merge_and_unload()
            elif acc.distributed_type == DistributedType.FSDP:
                # Every process holds shards: gather the whole weights (a collective, on every process).
                state_dict = acc.get_state_dict(self.model)
            model.save_pretrained(
                staging, is_main_process=acc.is_main_process, save_function=acc.save, state_dict=state_dict
            )
            if self.processing_class is not None and acc.is_main_process:
                self.processing_class.save_pretrained(staging)
            acc.wait_for_everyone()
        except Exception as error:
            full = is_disk_full(error, output_dir)  # before the staging folder gives its space back
            if acc.is_main_process:
                shutil.rmtree(staging, ignore_errors=True)
            if not full:
                raise
            last = checkpoint_dir(output_dir, self.state.completed_steps)
            raise OutOfSpaceError(
                f"cannot write the final model into {output_dir}: no space left on device ({free_space(output_dir)}); "
                f"nothing there was replaced. Its last checkpoint {last} is complete: free space, then run again "
                "with --resume_from_checkpoint latest to write the final model"
            ) from error
        if acc.is_main_process:
            move_into_place(staging, output_dir)
        acc.wait_for_everyone()

    def _finish(self) -> RunResults:
        acc, state = self.accelerator, self.state
        acc.wait_for_everyone()
        self._save_final_model()
        final = state.history[-1]
        memory, memory_kind = peak_memory_mb(acc.device)
        results = RunResults(
            **{**asdict(self.run_info), "seed": self.args.seed},
            metrics={k: v for k, v in final.items() if k != "step" and not k.startswith("num_samples")},
            num_eval_samples={k: v for k, v in final.items() if k.startswith("num_samples")},
            num_train_samples=len(self.train_dataset),
            train_steps=state.completed_steps,
            epochs=round(state.completed_steps / self.steps_per_epoch, 4),
            stopped_early=state.stopped_early,
            train_loss=state.train_loss,
            train_runtime_s=round(state.train_runtime_s, 2),
            train_samples_per_second=round(state.samples_seen / max(state.train_runtime_s, 1e-9), 3),
            peak_memory_mb=round(memory, 1),
            peak_memory_kind=memory_kind,
            num_processes=acc.num_processes,
            mixed_precision=acc.mixed_precision,
            eval_history=state.history,
            attention_marginals=self._marginal_results(),
        )
        if acc.is_main_process:
            results.write(self.args.output_dir)
        return results
