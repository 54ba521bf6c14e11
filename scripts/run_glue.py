"""Fine-tune a text encoder on a GLUE task (Hub ``nyu-mll/glue`` or local csv/json/GLUE .tsv files).

    accelerate launch scripts/run_glue.py --model_name_or_path bert-base-uncased --task_name mrpc \
        --attn_implementation sinkhorn --sinkhorn_iterations 3 --output_dir out/mrpc
"""

from sinkhorn_hf.training.run import main
from sinkhorn_hf.training.tasks.glue import GLUE

if __name__ == "__main__":
    main(GLUE)
