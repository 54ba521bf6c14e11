"""Fine-tuning on accelerate: the trainer, the GLUE / IMDB / image tasks, offline metrics, LoRA, results.json.

Scripts under ``scripts/`` (run_glue.py, run_imdb.py, run_image_classification.py) are ``main(TASK)`` of
:mod:`.run` with a task of :mod:`.tasks`: flags parsed into :mod:`.arguments` dataclasses, then :func:`.run.run_task`.
"""

from .arguments import ModelArguments, TrainerArguments
from .trainer import Trainer, make_accelerator

__all__ = ["ModelArguments", "Trainer", "TrainerArguments", "make_accelerator"]
