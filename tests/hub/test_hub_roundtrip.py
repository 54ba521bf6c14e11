"""convert → fine-tune with the trainer → card → reload from disk: the trained weights, Sinkhorn still on."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from hub_helpers import python_snippet, run_snippet
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from sinkhorn_hf.compat import config_attn_implementation
from sinkhorn_hf.hub import convert, select_files, write_card
from sinkhorn_hf.hub.card import REPO_ID_PLACEHOLDER

POSITIVE, NEGATIVE, FILLER = ["sinkhorn", "doubly", "stochastic"], ["padding", "mass", "cat"], ["the", "a", "on"]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """The trainer's Accelerator is a process-wide singleton: leave none behind for other tests."""
    from sinkhorn_hf.compat import reset_accelerate_state

    yield
    reset_accelerate_state()


def write_sst2(path: Path, rows: int, seed: int) -> Path:
    """GLUE SST-2 layout; the label is the polarity of the one sentiment word of each sentence."""
    rng = random.Random(seed)
    lines = ["sentence\tlabel"]
    for _ in range(rows):
        label = rng.randint(0, 1)
        words = rng.sample(FILLER, 2) + [rng.choice(POSITIVE if label else NEGATIVE)]
        rng.shuffle(words)
        lines.append(f"{' '.join(words)} \t{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_convert_finetune_card_reload(tiny_bert, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from sinkhorn_hf.training.arguments import ModelArguments, TrainerArguments
    from sinkhorn_hf.training.run import run_task
    from sinkhorn_hf.training.tasks.glue import GLUE, GlueDataArguments

    converted = convert(tiny_bert, tmp_path / "converted", iterations=3).output_dir
    train, dev = write_sst2(tmp_path / "train.tsv", 32, 0), write_sst2(tmp_path / "dev.tsv", 12, 1)
    run_dir = tmp_path / "run"
    results = run_task(
        GLUE,
        ModelArguments(model_name_or_path=str(converted), attn_implementation="sinkhorn", sinkhorn_iterations=3),
        GlueDataArguments(task_name="sst2", train_file=str(train), validation_file=str(dev)),
        TrainerArguments(output_dir=str(run_dir), max_train_steps=4, learning_rate=1e-3, checkpointing_steps="2"),
    )
    card = ModelCard.load(write_card(run_dir, base_model="prajjwal1/bert-tiny"))
    assert card.data.eval_results[0].metric_value == results.metrics["accuracy"]
    assert card.data.base_model == "prajjwal1/bert-tiny" and f"```bash\n{results.command}\n```" in card.text

    reloaded = AutoModelForSequenceClassification.from_pretrained(run_dir).eval()
    assert config_attn_implementation(reloaded.config) == "sinkhorn" and reloaded.config.sinkhorn_iterations == 3
    # The saved model is the trained one: the weights of the last training checkpoint, not the converted ones.
    final_state = load_file(run_dir / "checkpoints" / "step_4" / "model.safetensors")
    assert all(torch.equal(reloaded.state_dict()[name], value) for name, value in final_state.items())
    start = load_file(converted / "model.safetensors")
    assert not torch.equal(final_state["bert.encoder.layer.0.attention.self.query.weight"],
                           start["bert.encoder.layer.0.attention.self.query.weight"])  # fmt: skip

    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    sentences, labels = zip(*(line.rsplit(" \t", 1) for line in dev.read_text().splitlines()[1:]), strict=True)
    inputs = tokenizer(list(sentences), padding=True, return_tensors="pt")
    with torch.no_grad():
        sinkhorn_logits = reloaded(**inputs).logits
        # Reloaded from disk it reproduces the accuracy the trainer measured.
        accuracy = (sinkhorn_logits.argmax(-1) == torch.tensor([int(y) for y in labels])).float().mean().item()
        assert accuracy == pytest.approx(results.metrics["accuracy"])
        # Sinkhorn is what runs: the same weights with SoftMax give other outputs.
        reloaded.set_attn_implementation("eager")
        assert (reloaded(**inputs).logits - sinkhorn_logits).abs().max() > 1e-3

    printed = run_snippet(python_snippet(card.text).replace(REPO_ID_PLACEHOLDER, str(run_dir)))
    assert printed.split() == ["sinkhorn", "3"]
    # What push would send: the model and its record, not the checkpoints or tensorboard logs the run wrote.
    assert (run_dir / "checkpoints" / "step_2" / "optimizer.bin").is_file()
    assert select_files(run_dir) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "results.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
