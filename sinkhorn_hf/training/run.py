"""``run_task``: accelerator, data, config, model, trainer and results.json for any fine-tuning task.

Every script is ``main(TASK)``: a :class:`Task` says how to read its data arguments into a :class:`TaskData`
(datasets, processor, metrics) and how to batch them; everything else is the same for every task. ``main`` checks
the command line (flag values, that named paths exist, that the model can be found) before anything heavy runs,
and reports a user mistake in one line (:mod:`sinkhorn_hf.user_errors`; ``--debug`` for the traceback).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..adjoint import InexactAdjointError
from ..families import UnsupportedModelError
from ..user_errors import (
    ShortUsageMixin,
    UsageError,
    check_checkpoint_dir,
    check_local_path,
    debug_requested,
    is_main_process,
    one_line_errors,
)
from .arguments import ModelArguments, TrainerArguments
from .checkpoints import CheckpointError, OutOfSpaceError, check_run_start
from .metrics import MetricFn
from .output_lock import OutputDirInUseError
from .results import RunResults, run_info


@dataclass
class TaskData:
    """A task's data, ready to train on. ``evals`` maps a metric-name suffix to a dataset (``""``: the main
    one); ``label_names`` in class-id order (None: regression); ``processor`` is the tokenizer or image
    processor (None: the task builds one from the model config); ``info``: task fields of results.json."""

    task_name: str
    dataset: str | list[str]
    eval_split: str | list[str]
    train: Any
    evals: Mapping[str, Any]
    label_names: Sequence[str] | None
    compute_metrics: MetricFn
    main_metric: str
    processor: Any = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    """``load(data_args, model_args, seed)`` reads the data; ``collator(processor, config)`` batches it;
    ``auto_class`` builds the model; ``default_processor(config)`` serves a model built from a config."""

    data_arguments: type
    auto_class: str
    load: Callable[[Any, ModelArguments, int], TaskData]
    collator: Callable[[Any, Any], Any]
    default_processor: Callable[[Any], Any] | None = None
    load_kwargs: Mapping[str, Any] = field(default_factory=dict)


def label_config(label_names: Sequence[str] | None) -> dict[str, Any]:
    """``num_labels`` (1 for regression) and the id <-> name maps of a classification head."""
    if label_names is None:
        return {"num_labels": 1}
    labels = dict(enumerate(label_names))
    return {"num_labels": len(labels), "id2label": labels, "label2id": {v: k for k, v in labels.items()}}


def run_settings(model_args: ModelArguments, data_args: Any) -> dict[str, Any]:
    """Every model and data setting that changes what a run computes (the model, attention with every Sinkhorn
    setting, adjoint, LoRA, data files and limits), for the fingerprint a resumed run must match. Local paths are
    made absolute, so that a resume from another working directory matches."""

    def plain(value: Any) -> Any:
        return str(Path(value).resolve()) if isinstance(value, str) and Path(value).exists() else value

    settings = {f"model.{f.name}": plain(getattr(model_args, f.name)) for f in fields(model_args)}
    settings.update({f"model.sinkhorn_{k}": v for k, v in asdict(model_args.sinkhorn_settings).items()})
    settings.update({f"data.{f.name}": plain(getattr(data_args, f.name)) for f in fields(data_args)})
    return settings


def run_task(task: Task, model_args: ModelArguments, data_args: Any, trainer_args: TrainerArguments) -> RunResults:
    """Fine-tune on ``task``; writes the model, its processor and results.json into ``--output_dir`` (and a
    card and a Hub upload with ``--push_to_hub``). Progress is printed as lines, not bars, when stderr is not a
    terminal (a log file, CI), the libraries' own bars included."""
    import transformers

    from .modeling import build_model, load_config
    from .trainer import Trainer, make_accelerator

    if not sys.stderr.isatty():  # a log file: no carriage-return bars from the libraries either
        _quiet_library_bars()
    # Refuse a run that would mix with another's checkpoints before spending minutes on data and model.
    check_run_start(trainer_args.output_dir, trainer_args.resume_from_checkpoint, trainer_args.overwrite_output_dir)
    accelerator = make_accelerator(trainer_args)
    with accelerator.main_process_first():
        data = task.load(data_args, model_args, trainer_args.seed)
    config = load_config(model_args, **label_config(data.label_names))
    model, lora_targets = build_model(model_args, config, getattr(transformers, task.auto_class), **task.load_kwargs)
    processor = data.processor if data.processor is not None else task.default_processor(config)
    info = run_info(
        model_args,
        trainer_args,
        task_name=data.task_name,
        dataset=data.dataset,
        eval_split=data.eval_split,
        lora_targets=lora_targets,
        **data.info,
    )
    trainer = Trainer(
        model,
        trainer_args,
        train_dataset=data.train,
        eval_datasets=data.evals,
        data_collator=task.collator(processor, config),
        compute_metrics=data.compute_metrics,
        accelerator=accelerator,
        processing_class=processor,
        run_info=info,
        main_metric=data.main_metric,
        run_settings=run_settings(model_args, data_args),
    )
    results = trainer.train()
    if trainer_args.push_to_hub and accelerator.is_main_process:
        _push(trainer_args)
    return results


def _push(trainer_args: TrainerArguments) -> None:
    from tqdm.auto import tqdm

    from .. import hub

    hub.write_card(trainer_args.output_dir, repo_id=trainer_args.hub_model_id)
    report = hub.push(trainer_args.output_dir, trainer_args.hub_model_id, private=trainer_args.hub_private_repo)
    tqdm.write(f"pushed {len(report.files)} files to {trainer_args.hub_model_id}")


def task_parser(task: Task) -> Any:
    """The ``HfArgumentParser`` of a script: model, data and trainer arguments; a command-line error prints a
    one-line usage hint and the error (:class:`~sinkhorn_hf.user_errors.ShortUsageMixin`)."""
    from transformers import HfArgumentParser

    class ScriptParser(ShortUsageMixin, HfArgumentParser):
        pass

    return ScriptParser(
        (ModelArguments, task.data_arguments, TrainerArguments),
        epilog="A mistake is reported in one line; add --debug (or set SINKHORN_HF_DEBUG=1) for the full traceback.",
    )


def check_sources(model_args: ModelArguments, data_args: Any, trainer_args: TrainerArguments) -> None:
    """Before any heavy work: every local path a flag names exists (data files and folders, the model, its config,
    tokenizer or processor, an explicit checkpoint), and a model that is not a local folder can be found (its
    config loads from the Hub or the cache). Raises :class:`~sinkhorn_hf.user_errors.UsageError` naming the flag."""
    for item in fields(data_args):
        value = getattr(data_args, item.name)
        if item.name.endswith(("_file", "_dir")) and value is not None and not Path(value).expanduser().exists():
            raise UsageError(f"--{item.name} {value}: this file does not exist")
    check_checkpoint_dir(model_args.model_name_or_path, "--model_name_or_path")
    check_local_path(model_args.config_name, "--config_name")
    check_local_path(model_args.tokenizer_name, "--tokenizer_name")
    check_local_path(model_args.image_processor_name, "--image_processor_name")
    resume = trainer_args.resume_from_checkpoint
    if resume not in (None, "latest") and not Path(resume).expanduser().is_dir():
        raise UsageError(
            f"--resume_from_checkpoint {resume}: no such checkpoint folder (give a checkpoint's folder, or 'latest')"
        )
    name = model_args.model_name_or_path
    if name is not None and not Path(name).expanduser().exists():
        from transformers import AutoConfig

        try:
            AutoConfig.from_pretrained(name)
        except (OSError, ValueError) as error:
            raise UsageError(f"--model_name_or_path {name}: not a local folder, and not loadable: {error}") from error


def _quiet_library_bars() -> None:
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


# Mistakes the training code reports with its own exception types, shown as one line (exit status 1).
RUN_ERRORS = (CheckpointError, OutOfSpaceError, OutputDirInUseError, UnsupportedModelError, InexactAdjointError)


def main(task: Task, argv: Sequence[str] | None = None) -> RunResults:
    """A script's body: parse the command line (``argv``, default sys.argv; ``--debug`` anywhere shows full
    tracebacks), check it (:func:`check_sources`) and :func:`run_task`. A flag value the argument dataclasses refuse
    is a usage error (a one-line usage hint, the message, exit status 2); a user mistake found later is one line,
    exit status 1 (:data:`RUN_ERRORS` and every :class:`~sinkhorn_hf.user_errors.UserError`)."""
    argv, debug = debug_requested(sys.argv[1:] if argv is None else argv)
    parser = task_parser(task)
    try:
        arguments = parser.parse_args_into_dataclasses(argv)
    except ValueError as error:
        parser.error(str(error))
    with one_line_errors(parser.prog, debug=debug, also=RUN_ERRORS, quiet=not is_main_process()):
        check_sources(*arguments)
        return run_task(task, *arguments)
