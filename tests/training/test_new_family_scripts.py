"""run_glue.py's task on ModernBERT/GTE/EuroBERT-shaped models built from their configs (no Hub); the image script
on the newer vision families is tested in test_images.py."""

from __future__ import annotations

import json
import math

import pytest
import transformers
from transformers import HfArgumentParser

from sinkhorn_hf.compat import config_attn_implementation
from sinkhorn_hf.training.arguments import ModelArguments, TrainerArguments
from sinkhorn_hf.training.run import run_task
from sinkhorn_hf.training.tasks.glue import GLUE, GlueDataArguments

TEXT_SHAPE = "hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=4,pad_token_id=0"
TEXT_EXTRA = {  # special token ids inside the tiny vocabulary; ModernBERT's local layers see a window of 4
    "modernbert": ",local_attention=4,bos_token_id=2,eos_token_id=3,cls_token_id=2,sep_token_id=3",
    "gte": "",
    "eurobert": ",num_key_value_heads=2,bos_token_id=2,eos_token_id=3,mask_token_id=4",
}


@pytest.mark.parametrize(
    "model_type",
    ["modernbert", pytest.param("gte", marks=pytest.mark.slow), pytest.param("eurobert", marks=pytest.mark.slow)],
)
def test_run_glue_fine_tunes_a_model_built_from_its_config(model_type, tiny_bert, sst2_files, tmp_path):
    vocab = len(transformers.AutoTokenizer.from_pretrained(tiny_bert))
    flags = [
        "--model_type", model_type, "--config_overrides", f"vocab_size={vocab},{TEXT_SHAPE}{TEXT_EXTRA[model_type]}",
        "--tokenizer_name", str(tiny_bert), "--task_name", "sst2", "--train_file", str(sst2_files[0]),
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


def test_config_overrides_rebuild_the_fields_derived_from_them():
    from sinkhorn_hf.training.modeling import load_config

    config = load_config(ModelArguments(model_type="modernbert", config_overrides="num_hidden_layers=4"), num_labels=3)
    assert config.num_hidden_layers == 4 and len(config.layer_types) == 4 and config.num_labels == 3
    config.validate()  # what save_pretrained checks


def test_config_overrides_keep_a_config_file(tmp_path):
    from sinkhorn_hf.training.modeling import load_config

    transformers.ModernBertConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=3).save_pretrained(tmp_path)
    args = ModelArguments(model_type="modernbert", config_name=str(tmp_path), config_overrides="intermediate_size=48")
    config = load_config(args)
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (32, 3, 48)
