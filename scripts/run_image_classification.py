"""Fine-tune (or train from a config) a ViT-family image classifier on a Hub dataset, an image folder or
an .npz of uint8 arrays.

    python scripts/run_image_classification.py --model_type vit \
        --config_overrides "image_size=28,patch_size=4,hidden_size=128,num_hidden_layers=6" \
        --train_file ../shared/data/mnist/mnist.npz --attn_implementation sinkhorn --output_dir out/mnist
"""

from sinkhorn_hf.training.run import main
from sinkhorn_hf.training.tasks.images import IMAGES

if __name__ == "__main__":
    main(IMAGES)
