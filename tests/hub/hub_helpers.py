"""Helpers for the hub tests: tiny checkpoints saved as a Hub download leaves them, trainer-style results."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import tiny_models
import torch

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + (
    "sinkhorn attention makes every matrix doubly stochastic padding carries no mass rows and columns sum to one "
    "the cat sat on a mat dog ran"
).split()
SENTENCES = ["sinkhorn attention makes every matrix doubly stochastic", "the cat sat", "padding carries no mass"]


def tiny_tokenizer():
    from transformers import BertTokenizer

    return BertTokenizer(vocab={word: i for i, word in enumerate(dict.fromkeys(WORDS))})


def save_tiny_bert(directory: Path, seed: int = 0, max_shard_size: str | None = None, **config_kwargs) -> Path:
    """A 2-layer random BertForSequenceClassification and its WordPiece tokenizer, saved in ``directory``."""
    return tiny_models.save_tiny_bert(
        directory,
        tiny_tokenizer(),
        "BertForSequenceClassification",
        seed,
        max_shard_size,
        num_labels=2,
        initializer_range=0.5,  # peaked attention, far from doubly stochastic, so Sinkhorn K>1 visibly differs
        **config_kwargs,
    )


def text_batch(directory: Path) -> dict[str, torch.Tensor]:
    """A padded batch (lengths differ) made with the checkpoint's own tokenizer."""
    from transformers import AutoTokenizer

    return dict(AutoTokenizer.from_pretrained(directory)(SENTENCES, padding=True, return_tensors="pt"))


def logits(directory: Path, inputs: dict[str, torch.Tensor], **load_kwargs) -> torch.Tensor:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(directory, **load_kwargs).eval()
    with torch.no_grad():
        return model(**inputs).logits


def trainer_results(**overrides) -> dict:
    """A results.json as sinkhorn_hf's trainer writes it for a GLUE run from local files."""
    results = {
        "model_name_or_path": "google-bert/bert-base-uncased",
        "config_overrides": None,
        "task_name": "sst2",
        "dataset": ["/data/glue/SST-2/train.tsv", "/data/glue/SST-2/dev.tsv"],
        "attn_implementation": "sinkhorn",
        "sinkhorn_iterations": 3,
        "adjoint": "off",
        "lora": None,
        "command": "python scripts/run_glue.py --model_name_or_path google-bert/bert-base-uncased --task_name sst2 "
        "--attn_implementation sinkhorn --sinkhorn_iterations 3 --output_dir out/sst2",
        "eval_split": ["validation"],
        "seed": 42,
        "metrics": {"accuracy": 0.8761, "loss": 0.3125},
        "num_eval_samples": {"num_samples": 872},
        "num_train_samples": 8000,
        "train_steps": 500,
        "epochs": 1.0,
        "stopped_early": False,
        "train_runtime_s": 1201.5,
        "train_samples_per_second": 6.66,
        "peak_memory_mb": 2100.3,
        "peak_memory_kind": "host_max_rss",
    }
    results.update(overrides)
    return results


def write_results(run_dir: Path, results: dict) -> Path:
    path = run_dir / "results.json"
    path.write_text(json.dumps(results, indent=2))
    return path


def python_snippet(card_text: str) -> str:
    """The one ```python block of a card."""
    blocks = re.findall(r"```python\n(.*?)```", card_text, flags=re.S)
    assert len(blocks) == 1
    return blocks[0]


def run_snippet(code: str, namespace: dict | None = None) -> str:
    """Run a card's snippet as a user would paste it (its variables land in ``namespace``); return what it
    printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "<card snippet>", "exec"), {} if namespace is None else namespace)
    return printed.getvalue()


def fenced_blocks(markdown: str) -> tuple[list[str], list[str]]:
    """(the lines outside fenced code, the content of each fenced block) of ``markdown``, by CommonMark's fence
    rules: a line of 3+ backticks (or tildes) opens a block that only a line of at least as many of the same
    character closes. Fails when a block is left open."""
    outside, blocks, fence, content = [], [], None, []
    for line in markdown.splitlines():
        if fence is None:
            opening = re.match(r" {0,3}(`{3,}|~{3,})(.*)$", line)
            if opening and not (opening[1][0] == "`" and "`" in opening[2]):
                fence, content = opening[1], []
            else:
                outside.append(line)
        elif re.fullmatch(rf" {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*", line):
            blocks.append("\n".join(content))
            fence = None
        else:
            content.append(line)
    assert fence is None, f"a {fence} fence is never closed"
    return outside, blocks
