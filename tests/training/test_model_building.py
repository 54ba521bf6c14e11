"""Models the scripts build: LoRA defaults per family, adapters that train alone, adjoint, config overrides."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    HfArgumentParser,
)

from sinkhorn_hf.compat import config_attn_implementation
from sinkhorn_hf.training.arguments import ModelArguments, TrainerArguments
from sinkhorn_hf.training.lora import apply_lora
from sinkhorn_hf.training.modeling import load_config
from sinkhorn_hf.training.run import run_task
from sinkhorn_hf.training.tasks.glue import GLUE, GlueDataArguments


def tiny(model_type: str):
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    if model_type == "distilbert":
        config = AutoConfig.for_model("distilbert", vocab_size=50, dim=32, n_layers=2, n_heads=4, hidden_dim=64)
    elif model_type == "vit":
        config = AutoConfig.for_model("vit", image_size=16, patch_size=4, num_labels=3, **sizes)
        return AutoModelForImageClassification.from_config(config)
    else:
        config = AutoConfig.for_model(model_type, vocab_size=50, **sizes)
    return AutoModelForSequenceClassification.from_config(config)


@pytest.mark.parametrize(
    "model_type, adapted, heads",
    [
        ("bert", {"query", "value"}, {"classifier"}),
        ("roberta", {"query", "value"}, {"classifier"}),
        ("distilbert", {"q_lin", "v_lin"}, {"pre_classifier", "classifier"}),
        ("vit", {"q_proj", "v_proj"}, {"classifier"}),
    ],
)
def test_lora_defaults_train_adapters_and_head_only(model_type, adapted, heads):
    model, targets = apply_lora(tiny(model_type), r=2, alpha=4, dropout=0.0)
    assert set(targets) == adapted
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    lora_modules = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable if ".lora_" in n}
    assert lora_modules == adapted
    # everything else trainable is a full copy of a classification head
    rest = {n for n in trainable if ".lora_" not in n}
    assert rest and all(any(f"{h}.modules_to_save" in n for h in heads) for n in rest)
    n_layers = 2
    assert sum(".lora_A." in n for n in trainable) == len(adapted) * n_layers


def test_lora_targets_that_match_nothing_are_named():
    with pytest.raises(ValueError, match="query,value match no linear layer of this vit model; .* q_proj"):
        apply_lora(tiny("vit"), r=2, alpha=4, dropout=0.0, target_modules=["query", "value"])


def parse(*flags: str):
    return HfArgumentParser((ModelArguments, GlueDataArguments, TrainerArguments)).parse_args_into_dataclasses(
        list(flags)
    )


def test_glue_lora_run_trains_adapters_and_leaves_the_base_model(tiny_bert, rte_files, tmp_path):
    train, dev = rte_files
    out = tmp_path / "out"
    result = run_task(
        GLUE,
        *parse(
            "--model_name_or_path", str(tiny_bert), "--task_name", "rte", "--train_file", train,
            "--validation_file", dev, "--output_dir", str(out), "--lora_r", "4", "--learning_rate", "1e-2",
            "--num_train_epochs", "2", "--attn_implementation", "sinkhorn", "--sinkhorn_iterations", "5",
            "--max_length", "64", "--max_eval_samples", "1000",
        )
    )  # fmt: skip
    # recorded for the card: the token budget, and that the (small) dev file was evaluated whole
    assert result.max_length == 64 and result.eval_subset is False and result.train_loss is not None
    assert result.lora == {"r": 4, "alpha": 16.0, "dropout": 0.1, "target_modules": ["query", "value"]}
    assert result.sinkhorn_iterations == 5 and result.task_name == "rte"
    assert result.dataset == [train, dev] and result.eval_split == ["validation"]
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    base = load_file(tiny_bert / "model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert len(lora_b) == 4 and all(v.abs().max() > 0 for v in lora_b)  # B starts at zero: it trained
    assert not any(k.endswith("query.weight") for k in adapter)  # the base weights are not in the adapter

    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2), out / "adapter"
    )
    base_query = base["encoder.layer.0.attention.self.query.weight"]
    loaded_query = reloaded.base_model.model.bert.encoder.layer[0].attention.self.query.base_layer.weight
    assert torch.equal(base_query, loaded_query)

    # the run directory holds the merged model: it loads as Sinkhorn and computes what base + adapter compute
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert config_attn_implementation(merged.config) == "sinkhorn" and merged.config.sinkhorn_iterations == 5
    assert not torch.equal(merged.bert.encoder.layer[0].attention.self.query.weight, base_query)
    reloaded.set_attn_implementation("sinkhorn")
    reloaded.config.sinkhorn_iterations = 5
    ids = torch.randint(3, merged.config.vocab_size, (2, 9))
    inputs = {"input_ids": ids, "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, reloaded.eval()(**inputs).logits, rtol=1e-4, atol=1e-5)


def test_adjoint_checkpoint_scheme_trains_like_plain_backprop(tiny_bert, rte_files, tmp_path, monkeypatch):
    import sinkhorn_hf.adjoint

    enable, attached = sinkhorn_hf.adjoint.enable_adjoint, []

    def spy(model, scheme, **kwargs):
        stacks = enable(model, scheme=scheme, **kwargs)
        attached.append((scheme, stacks))
        return stacks

    monkeypatch.setattr(sinkhorn_hf.adjoint, "enable_adjoint", spy)
    train, dev = rte_files
    results = {}
    for scheme in ("off", "checkpoint"):
        out = tmp_path / scheme
        results[scheme] = run_task(
            GLUE,
            *parse(
                "--model_name_or_path", str(tiny_bert), "--task_name", "rte", "--train_file", train,
                "--validation_file", dev, "--output_dir", str(out), "--adjoint", scheme, "--max_train_steps", "6",
                "--learning_rate", "1e-3",
            )
        )  # fmt: skip
    assert results["checkpoint"].adjoint == "checkpoint"
    ((scheme, stacks),) = attached  # only the checkpoint run attached a stack
    assert scheme == "checkpoint" and len(stacks) == 1
    off = load_file(tmp_path / "off" / "model.safetensors")
    adjoint = load_file(tmp_path / "checkpoint" / "model.safetensors")
    for name, value in off.items():
        torch.testing.assert_close(adjoint[name], value, rtol=1e-4, atol=1e-6)


def test_config_overrides_apply_and_unknown_names_are_refused():
    config = load_config(ModelArguments(model_type="vit", config_overrides="image_size=28,patch_size=4"), num_labels=10)
    assert (config.image_size, config.patch_size, config.num_labels) == (28, 4, 10)
    with pytest.raises(ValueError, match=r"\['patch'\] that a vit config does not have"):
        load_config(ModelArguments(model_type="vit", config_overrides="patch=4"))


def test_model_source_must_be_exactly_one():
    with pytest.raises(ValueError, match="exactly one of --model_name_or_path"):
        ModelArguments()
    with pytest.raises(ValueError, match="exactly one of --model_name_or_path"):
        ModelArguments(model_name_or_path="x", model_type="vit")
