"""Fine-tune a text encoder on IMDB sentiment (Hub ``stanfordnlp/imdb`` or local csv(.gz) with text,label).

python scripts/run_imdb.py --model_name_or_path ... --max_length 512 --lora_r 8 --output_dir out/imdb
"""

from sinkhorn_hf.training.run import main
from sinkhorn_hf.training.tasks.imdb import IMDB

if __name__ == "__main__":
    main(IMDB)
