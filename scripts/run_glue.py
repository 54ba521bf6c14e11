"""Fine-tune a text encoder on a GLUE task (Hub ``nyu-mll/glue`` or local csv/json/GLUE .tsv files).

    accelerate launch scripts/run_glue.py --model_name_or_path bert-base-uncased --task_name mrpc \
        --attn_implementation sinkhorn --sinkhorn_iterations 3 --output_dir out/mrpc
"""

from transformers import HfArgumentParser

from sinkhorn_hf.training.arguments import ModelArguments, TrainerArguments
from sinkhorn_hf.training.glue import GlueDataArguments, run_glue

if __name__ == "__main__":
    parser = HfArgumentParser((ModelArguments, GlueDataArguments, TrainerArguments))
    run_glue(*parser.parse_args_into_dataclasses())
