"""The fine-tuning scripts on the newer encoder families, built from configs (no Hub): run_glue.py's task on
ModernBERT/GTE/EuroBERT-shaped models, run_image_classification.py's on I-JEPA/ViT-MSN-shaped ones."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import transformers
from conftest import NEGATIVE, POSITIVE, VOCAB
from test_images import parse as parse_image_flags
from test_images import quadrant_images
from transformers import HfArgumentParser

from sinkhorn_hf.compat import config_attn_implementation
from sinkhorn_hf.training.arguments import ModelArguments, TrainerArguments
from sinkhorn_hf.training.run import run_task
from sinkhorn_hf.training.tasks.glue import GLUE, GlueDataArguments
from sinkhorn_hf.training.tasks.images import IMAGES

TEXT_SHAPE = "hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=4,pad_token_id=0"
TEXT_EXTRA = {  # special token ids inside the tiny vocabulary; ModernBERT's local layers see a window of 4
    "modernbert": ",local_attention=4,bos_token_id=2,eos_token_id=3,cls_token_id=2,sep_token_id=3",
    "gte": "",
    "eurobert": ",num_key_value_heads=2,bos_token_id=2,eos_token_id=3,mask_token_id=4",
}


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB + POSITIVE + NEGATIVE)}).save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "model_type",
    ["modernbert", pytest.param("gte", marks=pytest.mark.slow), pytest.param("eurobert", marks=pytest.mark.slow)],
)
def test_run_glue_fine_tunes_a_model_built_from_its_config(model_type, word_tokenizer, sst2_files, tmp_path):
    vocab = len(VOCAB + POSITIVE + NEGATIVE)
    flags = [
        "--model_type", model_type, "--config_overrides", f"vocab_size={vocab},{TEXT_SHAPE}{TEXT_EXTRA[model_type]}",
        "--tokenizer_name", str(word_tokenizer), "--task_name", "sst2", "--train_file", str(sst2_files[0]),
        "--validation_file", str(sst2_files[1]), "--output_dir", str(tmp_path), "--max_train_steps", "3",
        "--logging_steps", "1", "--attn_implementation", "sinkhorn", "--sinkhorn_iterations", "4",
    ]  # fmt: skip
    result = run_task(
        GLUE,
        *HfArgumentParser((ModelArguments, GlueDataArguments, TrainerArguments)).parse_args_into_dataclasses(flags),
    )
    assert math.isfinite(result.train_loss) and 0 <= result.metrics["accuracy"] <= 1
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["attn_implementation"] == "sinkhorn" and saved["sinkhorn_iterations"] == 4
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert config_attn_implementation(model.config) == "sinkhorn" and model.config.model_type == model_type
    assert model.config.num_hidden_layers == 2


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["ijepa", "vit_msn"])
def test_run_image_classification_learns_with_a_model_built_from_its_config(model_type, tmp_path):
    x_train, y_train = quadrant_images(160, 0)
    x_test, y_test = quadrant_images(37, 1)
    npz = tmp_path / "quadrants.npz"
    np.savez_compressed(npz, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    shape = "image_size=12,patch_size=4,hidden_size=32,num_hidden_layers=2,num_attention_heads=4,intermediate_size=64"
    result = run_task(
        IMAGES,
        *parse_image_flags(
            "--model_type", model_type, "--config_overrides", shape, "--train_file", str(npz), "--output_dir",
            str(tmp_path / "out"), "--attn_implementation", "sinkhorn", "--num_train_epochs", "4",
            "--learning_rate", "2e-3", "--per_device_train_batch_size", "16",
        )
    )  # fmt: skip
    assert result.metrics["accuracy"] > 0.9
    model = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "out")
    assert config_attn_implementation(model.config) == "sinkhorn" and model.config.model_type == model_type
