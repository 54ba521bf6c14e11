"""Fine-tuning on accelerate: the trainer, GLUE / IMDB / image pipelines, offline metrics, LoRA.

Scripts under ``scripts/`` (run_glue.py, run_imdb.py, run_image_classification.py) parse flags into
:mod:`.arguments` dataclasses and call the ``run_*`` function of :mod:`.glue`, :mod:`.imdb` or :mod:`.images`.
"""

from .arguments import ModelArguments, TrainerArguments
from .trainer import Trainer, make_accelerator

__all__ = ["ModelArguments", "Trainer", "TrainerArguments", "make_accelerator"]
