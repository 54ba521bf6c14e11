"""convert → fine-tune a few steps → save → card → reload from disk: same outputs, Sinkhorn still on."""

from __future__ import annotations

import torch
from hub_helpers import python_snippet, run_snippet, text_batch, trainer_results, write_results
from huggingface_hub import ModelCard

from sinkhorn_hf.hub import convert, select_files, write_card
from sinkhorn_hf.hub.card import REPO_ID_PLACEHOLDER


def test_convert_finetune_card_reload(tiny_bert, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    converted = convert(tiny_bert, tmp_path / "converted", iterations=3).output_dir
    # No dropout, so a few steps on one batch must lower its loss.
    model = AutoModelForSequenceClassification.from_pretrained(
        converted, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    assert model.config._attn_implementation == "sinkhorn"
    inputs = text_batch(converted)
    labels = torch.tensor([1, 0, 1])

    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    losses = []
    for _ in range(5):
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    model.eval()
    with torch.no_grad():
        trained_logits = model(**inputs).logits

    run_dir = tmp_path / "run"
    model.save_pretrained(run_dir)
    AutoTokenizer.from_pretrained(converted).save_pretrained(run_dir)
    accuracy = (trained_logits.argmax(-1) == labels).float().mean().item()
    write_results(run_dir, trainer_results(model_name_or_path=str(converted), metrics={"accuracy": accuracy}))
    card = ModelCard.load(write_card(run_dir, base_model="prajjwal1/bert-tiny"))
    assert card.data.eval_results[0].metric_value == accuracy

    reloaded = AutoModelForSequenceClassification.from_pretrained(run_dir).eval()
    assert reloaded.config._attn_implementation == "sinkhorn" and reloaded.config.sinkhorn_iterations == 3
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, trained_logits)
        # Sinkhorn is what runs: the same weights with SoftMax give other outputs.
        reloaded.set_attn_implementation("eager")
        assert (reloaded(**inputs).logits - trained_logits).abs().max() > 1e-3
    # The fine-tuned weights were saved, not the converted ones.
    original = AutoModelForSequenceClassification.from_pretrained(converted).eval()
    with torch.no_grad():
        assert not torch.allclose(original(**inputs).logits, trained_logits)

    assert run_snippet(python_snippet(card.text).replace(REPO_ID_PLACEHOLDER, str(run_dir))).split() == [
        "sinkhorn",
        "3",
    ]
    assert select_files(run_dir) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "results.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
