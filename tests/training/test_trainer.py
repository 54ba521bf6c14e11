"""The accelerate trainer: exact resume after a crash, schedule, early stopping, results.json, trackers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from sinkhorn_hf.compat import config_attn_implementation
from sinkhorn_hf.training.arguments import ModelArguments, TrainerArguments
from sinkhorn_hf.training.checkpoints import list_checkpoints
from sinkhorn_hf.training.modeling import build_model, load_config
from sinkhorn_hf.training.results import RunInfo, RunResults
from sinkhorn_hf.training.run import run_settings
from sinkhorn_hf.training.tasks.glue import (
    GLUE_TASKS,
    GlueDataArguments,
    compute_glue_metrics,
    load_glue_file,
    tokenize,
)
from sinkhorn_hf.training.trainer import Trainer, make_accelerator


class CrashAfter:
    """A collator that dies on its n-th call, like a run killed while reading data."""

    def __init__(self, collator, calls: int) -> None:
        self.collator, self.calls = collator, calls

    def __call__(self, rows):
        self.calls -= 1
        if self.calls < 0:
            raise KeyboardInterrupt("simulated kill")
        return self.collator(rows)


def make_trainer(
    model_dir: Path,
    files: tuple[Path, Path],
    out: Path,
    crash_after: int | None = None,
    attn="sinkhorn",
    model_settings: dict | None = None,
    **overrides,
):
    settings = dict(
        output_dir=str(out), per_device_train_batch_size=8, learning_rate=3e-3, num_train_epochs=5, seed=7,
        logging_steps=1,
    )  # fmt: skip
    settings.update(overrides)
    args = TrainerArguments(**settings)
    accelerator = make_accelerator(args)
    task = GLUE_TASKS["sst2"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train, dev = (tokenize(load_glue_file(str(f), task), task, tokenizer, 32) for f in files)
    model_args = ModelArguments(model_name_or_path=str(model_dir), attn_implementation=attn, **(model_settings or {}))
    data_args = GlueDataArguments(task_name="sst2", train_file=str(files[0]), validation_file=str(files[1]))
    model, _ = build_model(model_args, load_config(model_args, num_labels=2), AutoModelForSequenceClassification)
    collator = DataCollatorWithPadding(tokenizer)
    return Trainer(
        model,
        args,
        train_dataset=train,
        eval_datasets={"": dev},
        data_collator=collator if crash_after is None else CrashAfter(collator, crash_after),
        compute_metrics=compute_glue_metrics(task),
        accelerator=accelerator,
        processing_class=tokenizer,
        run_info=RunInfo(model_name_or_path=str(model_dir), command="pytest", task_name="sst2"),
        main_metric="accuracy",
        run_settings=run_settings(model_args, data_args),
    )


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(tiny_bert, sst2_files, tmp_path):
    # 96 rows / batch 8 = 12 batches per epoch, 6 optimizer steps per epoch with accumulation 2; dropout on.
    common = dict(num_train_epochs=3, gradient_accumulation_steps=2, checkpointing_steps="4", eval_steps=3,
                  warmup_ratio=0.2)  # fmt: skip
    full = make_trainer(tiny_bert, sst2_files, tmp_path / "full", **common).train()

    # The collator serves 12 train batches in epoch 1, 2 eval batches at steps 3 and 6, then epoch 2; the
    # loader reads one batch ahead, so its 22nd call reads batch 6 of epoch 2 while step 9 is under way:
    # the last checkpoint is step 8, in the middle of epoch 2 (4 batches read).
    with pytest.raises(KeyboardInterrupt):
        make_trainer(tiny_bert, sst2_files, tmp_path / "killed", crash_after=21, **common).train()
    assert [p.name for p in list_checkpoints(tmp_path / "killed")] == ["step_4", "step_8"]
    resumed = make_trainer(tiny_bert, sst2_files, tmp_path / "killed", resume_from_checkpoint="latest", **common)
    result = resumed.train()

    assert result.train_steps == full.train_steps == 18
    assert result.metrics == full.metrics
    assert [h["step"] for h in result.eval_history] == [3, 6, 9, 12, 15, 18]
    assert result.eval_history == full.eval_history
    full_weights = load_file(tmp_path / "full" / "model.safetensors")
    resumed_weights = load_file(tmp_path / "killed" / "model.safetensors")
    assert full_weights.keys() == resumed_weights.keys()
    for name, value in full_weights.items():
        assert torch.equal(value, resumed_weights[name]), name


def test_resume_refuses_a_different_run(tiny_bert, sst2_files, tmp_path):
    make_trainer(tiny_bert, sst2_files, tmp_path, num_train_epochs=1).train()
    other = make_trainer(tiny_bert, sst2_files, tmp_path, num_train_epochs=1, per_device_train_batch_size=4,
                         resume_from_checkpoint="latest")  # fmt: skip
    with pytest.raises(ValueError, match="per_device_train_batch_size"):
        other.train()


def test_results_json_and_saved_model(tiny_bert, sst2_files, tmp_path):
    result = make_trainer(tiny_bert, sst2_files, tmp_path, save_total_limit=1, checkpointing_steps="epoch").train()
    written = json.loads((tmp_path / "results.json").read_text())
    assert written == json.loads(json.dumps(result.to_dict()))
    assert RunResults.read(tmp_path / "results.json") == result
    assert {"task_name", "metrics", "num_train_samples", "train_steps", "epochs", "seed", "train_runtime_s",
            "train_samples_per_second", "peak_memory_mb"} <= written.keys()  # fmt: skip
    assert written["num_train_samples"] == 96 and written["train_steps"] == 60 and written["epochs"] == 5
    assert written["num_eval_samples"] == {"num_samples": 41}
    assert written["metrics"]["accuracy"] > 0.9  # the polarity word decides the label
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_60"]
    # The saved model reloads as a Sinkformer and reproduces the reported accuracy.
    import sinkhorn_hf  # noqa: F401

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert config_attn_implementation(model.config) == "sinkhorn"
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    task = GLUE_TASKS["sst2"]
    dev = load_glue_file(str(sst2_files[1]), task)
    with torch.no_grad():
        batch = tokenizer(list(dev["sentence"]), padding=True, return_tensors="pt")
        predictions = model(**batch).logits.argmax(-1)
    accuracy = (predictions == torch.tensor(list(dev["labels"]))).float().mean().item()
    assert accuracy == pytest.approx(written["metrics"]["accuracy"])


def test_warmup_schedule_and_tensorboard_logs(tiny_bert, sst2_files, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = make_trainer(tiny_bert, sst2_files, tmp_path, learning_rate=1e-3, max_train_steps=6,
                          num_warmup_steps=2, with_tracking=True).train()  # fmt: skip
    logs = EventAccumulator(str(tmp_path / "runs" / "sinkhorn_hf"))  # accelerate's tensorboard layout
    logs.Reload()
    lrs = {e.step: e.value for e in logs.Scalars("train/learning_rate")}
    # linear warmup over 2 steps, then linear decay to 0 at step 6 (value after each step's update)
    expected = {1: 0.5e-3, 2: 1e-3, 3: 0.75e-3, 4: 0.5e-3, 5: 0.25e-3, 6: 0.0}
    assert lrs.keys() == expected.keys()
    for step, value in expected.items():
        assert lrs[step] == pytest.approx(value, abs=1e-9)
    assert [e.step for e in logs.Scalars("eval/accuracy")] == [6]
    # results.json records the final training loss: the last one logged (tensorboard keeps float32)
    losses = logs.Scalars("train/loss")
    assert losses[-1].step == 6 and len({e.value for e in losses}) > 1
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["train_loss"] == result.train_loss == pytest.approx(losses[-1].value, rel=1e-6)


def test_train_loss_is_recorded_when_the_run_is_shorter_than_a_logging_window(tiny_bert, sst2_files, tmp_path, capsys):
    """A run of 5 steps under the default --logging_steps (50) still records train_loss: the mean of its 5 step
    losses, as a run logging every step (same seed, same batches) sees them. --report_to alone turns tracking on.
    Output that is not a terminal (here: captured) gets one line per logging window and no progress bar."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    every_step = make_trainer(tiny_bert, sst2_files, tmp_path / "every", max_train_steps=5, report_to="tensorboard")
    assert every_step.args.with_tracking
    every_step.train()
    logs = EventAccumulator(str(tmp_path / "every" / "runs" / "sinkhorn_hf"))
    logs.Reload()
    step_losses = [e.value for e in logs.Scalars("train/loss")]
    assert len(step_losses) == 5
    capsys.readouterr()
    default = make_trainer(tiny_bert, sst2_files, tmp_path / "default", max_train_steps=5, logging_steps=50)
    result = default.train()
    assert result.train_loss == pytest.approx(sum(step_losses) / 5, rel=1e-5)
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("step ")] == ["step 5/5", "step 5"]  # loss, eval
    assert "\r" not in out and "train:" not in err and "eval:" not in err  # no progress bar of ours in a log
    assert not (tmp_path / "default" / "runs").exists()  # no tracker unless asked for


@pytest.mark.parametrize(
    "flags, tracking, trackers",
    [
        ({}, False, None),
        ({"report_to": "tensorboard"}, True, ["tensorboard"]),
        ({"report_to": "tensorboard, wandb"}, True, ["tensorboard", "wandb"]),
        ({"with_tracking": True}, True, ["tensorboard"]),
        ({"with_tracking": True, "report_to": "none"}, False, None),
    ],
)
def test_asking_for_a_tracker_turns_tracking_on(flags, tracking, trackers):
    args = TrainerArguments(output_dir="o", **flags)
    assert (args.with_tracking, args.trackers) == (tracking, trackers)


def test_early_stopping_stops_after_patience(tiny_bert, sst2_files, tmp_path):
    # With a zero learning rate the metric never improves: best at the first eval, then `patience` more.
    result = make_trainer(tiny_bert, sst2_files, tmp_path, learning_rate=0.0, eval_steps=2,
                          early_stopping_patience=2).train()  # fmt: skip
    assert result.stopped_early is True
    assert result.train_steps == 6
    assert [h["step"] for h in result.eval_history] == [2, 4, 6]


def test_early_stopping_on_an_unknown_metric_is_an_error(tiny_bert, sst2_files, tmp_path):
    trainer = make_trainer(tiny_bert, sst2_files, tmp_path, eval_steps=2, early_stopping_patience=1,
                           metric_for_best_model="f1")  # fmt: skip
    with pytest.raises(ValueError, match="'f1' is not among the metrics: accuracy"):
        trainer.train()


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(checkpointing_steps="often"), "positive integer or 'epoch'"),
        (dict(gradient_accumulation_steps=0), "gradient_accumulation_steps must be >= 1"),
        (dict(warmup_ratio=0.1, num_warmup_steps=3), "not both"),
    ],
)
def test_bad_trainer_arguments(bad, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        TrainerArguments(output_dir=str(tmp_path), **bad)


def test_push_to_hub_writes_a_card_and_uploads_the_run(tiny_bert, sst2_files, tmp_path, monkeypatch):
    from transformers import HfArgumentParser

    import sinkhorn_hf.hub
    from sinkhorn_hf.training.run import run_task
    from sinkhorn_hf.training.tasks.glue import GLUE, GlueDataArguments

    real_push, pushed = sinkhorn_hf.hub.push, []

    def offline_push(run_dir, repo_id, *, private):
        pushed.append((repo_id, private))
        return real_push(run_dir, repo_id, private=private, dry_run=True)  # checks the card, selects files

    monkeypatch.setattr(sinkhorn_hf.hub, "push", offline_push)
    parser = HfArgumentParser((ModelArguments, GlueDataArguments, TrainerArguments))
    flags = [
        "--model_name_or_path", str(tiny_bert), "--task_name", "sst2", "--train_file", str(sst2_files[0]),
        "--validation_file", str(sst2_files[1]), "--output_dir", str(tmp_path), "--max_train_steps", "2",
        "--attn_implementation", "sinkhorn", "--push_to_hub", "--hub_model_id", "someone/tiny-sinkhorn-sst2",
    ]  # fmt: skip
    run_task(GLUE, *parser.parse_args_into_dataclasses(flags))
    assert pushed == [("someone/tiny-sinkhorn-sst2", False)]
    card = (tmp_path / "README.md").read_text()
    assert "sinkhorn" in card and "someone/tiny-sinkhorn-sst2" in card
    with pytest.raises(ValueError, match="--push_to_hub needs --hub_model_id"):
        TrainerArguments(output_dir=str(tmp_path), push_to_hub=True)


def test_gradients_are_clipped_before_each_step(tiny_bert, sst2_files, tmp_path, monkeypatch):
    norms = []
    real_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    make_trainer(tiny_bert, sst2_files, tmp_path / "clipped", max_train_steps=4, max_grad_norm=1e-3).train()
    assert len(norms) == 4 and max(norms) <= 1e-3 * (1 + 1e-5)
    norms.clear()
    make_trainer(tiny_bert, sst2_files, tmp_path / "free", max_train_steps=4, max_grad_norm=0.0).train()
    assert min(norms) > 1e-2  # the same steps unclipped


def test_bf16_mixed_precision_trains(tiny_bert, sst2_files, tmp_path):
    # sdpa: sinkhorn's backward under bf16 autocast is the attention module's to test
    trainer = make_trainer(tiny_bert, sst2_files, tmp_path, attn="sdpa", max_train_steps=3, mixed_precision="bf16")
    result = trainer.train()
    assert result.mixed_precision == "bf16" and result.train_steps == 3
    weights = load_file(tmp_path / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert weights["classifier.weight"].dtype == torch.float32  # autocast; the master weights stay float32
