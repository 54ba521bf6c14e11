"""Fine-tune a text encoder on IMDB sentiment (Hub ``stanfordnlp/imdb`` or local csv(.gz) with text,label).

python scripts/run_imdb.py --model_name_or_path ... --max_length 512 --lora_r 8 --output_dir out/imdb
"""

from transformers import HfArgumentParser

from sinkhorn_hf.training.arguments import ModelArguments, TrainerArguments
from sinkhorn_hf.training.imdb import ImdbDataArguments, run_imdb

if __name__ == "__main__":
    parser = HfArgumentParser((ModelArguments, ImdbDataArguments, TrainerArguments))
    run_imdb(*parser.parse_args_into_dataclasses())
