"""The fine-tuning loop, on ``accelerate.Accelerator`` (one CPU, one GPU, or many through ``accelerate launch``).

Checkpoints hold everything a run needs to continue bit-for-bit: model, optimizer, scheduler and RNG states
(``Accelerator.save_state``) and the loop position (:class:`~.checkpoints.TrainerState`). The data order of
epoch e is a pure function of (seed, e), so a resumed run re-reads the epoch and skips the batches it had
already consumed.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import ProjectConfiguration, set_seed
from peft import PeftModel
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import get_scheduler

from .arguments import TrainerArguments
from .checkpoints import TrainerState, checkpoint_dir, prune_checkpoints, resolve_checkpoint
from .metrics import EvalOutput, MetricFn
from .results import RunInfo, RunResults, peak_memory_mb

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"  # where a LoRA run keeps its adapter; the run directory itself holds the merged model
EXAMPLE_ID = "example_id"  # batch key naming the example a row belongs to; gathered, never fed to the model


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
        log_with=[t.strip() for t in args.report_to.split(",")] if args.with_tracking else None,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=str(Path(args.output_dir) / "runs")
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    if accelerator.num_processes == 1 and "MASTER_ADDR" in os.environ and "LOCAL_RANK" not in os.environ:
        # `accelerate launch --cpu --num_processes N` (N > 1) starts one process and expects mpirun to start the rest.
        raise RuntimeError(
            "this process was launched for distributed training but runs alone: `accelerate launch --cpu "
            "--num_processes N` needs MPI (--mpirun_hostfile). For N CPU processes use `accelerate launch "
            "--multi_gpu --num_processes N` (no GPU needed) or `torchrun --nproc_per_node N`."
        )
    set_seed(args.seed)
    return accelerator


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
        self.model = model

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
            generator=torch.Generator().manual_seed(args.seed),
        )
        eval_loaders = {
            key: DataLoader(
                ds,
                batch_size=args.per_device_eval_batch_size,
                collate_fn=self.data_collator,
                num_workers=args.dataloader_num_workers,
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
        acc.register_for_checkpointing(self.state)
        self.state.fingerprint = {
            "max_steps": self.max_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "num_processes": acc.num_processes,
            "num_train_samples": len(self.train_dataset),
            "seed": args.seed,
        }

    def _resume(self) -> None:
        path = resolve_checkpoint(self.args.resume_from_checkpoint, self.args.output_dir)
        expected = dict(self.state.fingerprint)
        self.accelerator.load_state(str(path))
        differences = {
            k: (self.state.fingerprint.get(k), v) for k, v in expected.items() if self.state.fingerprint.get(k) != v
        }
        if differences:
            raise ValueError(
                f"cannot resume from {path}: the run that wrote it differs in "
                + ", ".join(f"{k} (checkpoint {old}, now {new})" for k, (old, new) in differences.items())
            )
        self.accelerator.print(f"resumed from {path} at step {self.state.completed_steps}")

    # ---------------------------------------------------------------- evaluation
    def evaluate(self) -> dict[str, float]:
        """Metrics over every evaluation set, gathered from all processes without duplicates."""
        acc = self.accelerator
        self.model.eval()
        metrics: dict[str, float] = {}
        for suffix, loader in self.eval_loaders.items():
            logits, labels, ids = [], [], []
            for batch in tqdm(loader, desc=f"eval{suffix}", leave=False, disable=not acc.is_local_main_process):
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
        self._pause_clock()
        self.state.last_checkpoint_step = self.state.completed_steps
        self.accelerator.save_state(str(checkpoint_dir(self.args.output_dir, self.state.completed_steps)))
        if self.accelerator.is_main_process:
            prune_checkpoints(self.args.output_dir, self.args.save_total_limit)
        self.accelerator.wait_for_everyone()
        self._clock = time.perf_counter()

    # ---------------------------------------------------------------- training
    def train(self) -> RunResults:
        """Train to ``max_steps`` (or early stop), evaluate, save model and results.json; return the results."""
        args, acc = self.args, self.accelerator
        self._prepare()
        if args.resume_from_checkpoint:
            self._resume()
        state = self.state
        if args.with_tracking:
            hparams = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
            acc.init_trackers("sinkhorn_hf", config=hparams)
        every_ckpt, every_eval = args.checkpoint_every, args.eval_steps
        progress = tqdm(
            total=self.max_steps, initial=state.completed_steps, desc="train", disable=not acc.is_local_main_process
        )
        running_loss, running_batches = torch.zeros((), device=acc.device), 0
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
                progress.update(1)
                if state.completed_steps % args.logging_steps == 0:
                    mean_loss = acc.gather(running_loss).mean().item() / running_batches
                    acc.log(
                        {"train/loss": mean_loss, "train/learning_rate": self.scheduler.get_last_lr()[0]},
                        step=state.completed_steps,
                    )
                    state.train_loss = mean_loss
                    progress.set_postfix(loss=f"{mean_loss:.4f}")
                    running_loss.zero_()
                    running_batches = 0
                if every_eval and state.completed_steps % every_eval == 0:
                    self._evaluate_and_track()
                if every_ckpt and state.completed_steps % every_ckpt == 0:
                    self._save_checkpoint()
                if self._done():
                    break
            else:  # the epoch ran to its end
                state.epoch += 1
                state.batch_in_epoch = 0
                if every_eval is None:
                    self._evaluate_and_track()
                if args.checkpointing_steps == "epoch":
                    self._save_checkpoint()
        progress.close()
        if state.last_eval_step != state.completed_steps:
            self._evaluate_and_track()
        self._pause_clock()
        if state.last_checkpoint_step != state.completed_steps:  # not the file system: ranks must agree
            self._save_checkpoint()
        results = self._finish()
        acc.end_training()
        return results

    def _done(self) -> bool:
        return self.state.completed_steps >= self.max_steps or self.state.stopped_early

    def _pause_clock(self) -> None:
        # Runtime counts training only, not evaluation or checkpoint writing.
        self.state.train_runtime_s += time.perf_counter() - self._clock
        self._clock = time.perf_counter()

    def _finish(self) -> RunResults:
        acc, state = self.accelerator, self.state
        acc.wait_for_everyone()
        model = acc.unwrap_model(self.model)
        if isinstance(model, PeftModel):
            # The adapter alone cannot be loaded, carded or pushed as a model: keep it in adapter/ and save the
            # merged weights at the top, so the run directory loads with from_pretrained like any other run.
            model.save_pretrained(
                Path(self.args.output_dir) / ADAPTER_DIR, is_main_process=acc.is_main_process, save_function=acc.save
            )
            model = model.merge_and_unload()
        model.save_pretrained(self.args.output_dir, is_main_process=acc.is_main_process, save_function=acc.save)
        if self.processing_class is not None and acc.is_main_process:
            self.processing_class.save_pretrained(self.args.output_dir)
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
        )
        if acc.is_main_process:
            results.write(self.args.output_dir)
        return results
