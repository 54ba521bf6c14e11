"""Does SoftMax attention drift toward doubly stochastic during training (the Sinkformers paper's Figure 1)?
Tracks the column sums of SoftMax attention on a fixed evaluation batch every N steps, in two settings:

    python scripts/track_attention_drift.py mnist --data ../shared/data/mnist/mnist.npz --epochs 3 --every 100 \
        --out runs/drift_mnist
    python scripts/track_attention_drift.py sst2 --model ../shared/models/all-MiniLM-L6-v2 \
        --train-file ../shared/data/glue/SST-2/train.tsv --validation-file ../shared/data/glue/SST-2/dev.tsv \
        --max-train-samples 4800 --every 25 --out runs/drift_sst2

``mnist``: the Sinkformers MNIST protocol at K = 1 (SoftMax), patch 7 (the attention-only ViT of
:mod:`sinkformers_vit`, Adam lr 1e-3, batch 100, no lr decay in these few epochs), a small loop driving
:class:`~sinkhorn_hf.training.marginals.MarginalTracker` on the first 100 test images (its SoftMax attention is
recomputed from each block's q, k, as that model has no ``output_attentions``). ``sst2``: fine-tuning the
pretrained MiniLM with ``transformers.Trainer`` and
:class:`~sinkhorn_hf.training.callbacks.AttentionMarginalsCallback` on the first 32 dev sentences (padded;
column sums over valid tokens only), a seeded random training subset, then dev accuracy.
Both write OUT/attention_marginals.json and OUT/attention_marginals.png, and print the first and last records.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from sinkhorn_hf.training.marginals import MarginalTracker


def vit_softmax_attentions(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, ...]:
    """SoftMax(q kᵀ/√d) of every block of an :class:`AttentionOnlyViT` on ``batch["images"]``: L × (B, H, N, N)."""
    captured: list[Tensor] = []
    hooks = [
        block.attention.to_qkv.register_forward_hook(lambda module, args, out: captured.append(out))
        for block in model.blocks
    ]
    try:
        model(batch["images"])
    finally:
        for hook in hooks:
            hook.remove()
    attentions = []
    for block, qkv in zip(model.blocks, captured, strict=True):
        heads, dim = block.attention.heads, block.attention.head_dim
        q, k, _ = qkv.view(*qkv.shape[:2], 3, heads, dim).permute(2, 0, 3, 1, 4)
        attentions.append(torch.softmax(q @ k.transpose(-1, -2) * dim**-0.5, dim=-1))
    return tuple(attentions)


def track_mnist(args: argparse.Namespace) -> MarginalTracker:
    from reproduce_sinkformers import TRAIN_BATCH, accuracy, load_mnist, to_tensors
    from sinkformers_vit import AttentionOnlyViT

    arrays = load_mnist(args.data)
    train = slice(None, args.max_train_samples)
    x_train, y_train = to_tensors(arrays["x_train"][train], arrays["y_train"][train], args.device)
    x_test, y_test = to_tensors(arrays["x_test"], arrays["y_test"], args.device)
    torch.manual_seed(args.seed)
    model = AttentionOnlyViT(args.patch_size, iterations=1).to(args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    title = (
        f"attention-only ViT on MNIST, K=1 (SoftMax), patch {args.patch_size}: "
        f"{len(x_train)} train images, {args.epochs} epochs"
    )
    tracker = MarginalTracker(model, {"images": x_test[:100]}, args.every, vit_softmax_attentions, title)
    shuffle, step = torch.Generator().manual_seed(args.seed), 0
    tracker.maybe_track(step)
    for epoch in range(args.epochs):
        model.train()
        for batch in torch.randperm(len(x_train), generator=shuffle).to(args.device).split(TRAIN_BATCH):
            loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            tracker.maybe_track(step)
        print(f"epoch {epoch + 1}: test accuracy {accuracy(model, x_test, y_test):.2f} %", file=sys.stderr, flush=True)
    if tracker.records[-1]["step"] != step:
        tracker.track(step)
    return tracker


def read_sst2(path: Path) -> tuple[list[str], list[int]]:
    """GLUE's SST-2 TSV (sentence<TAB>label, no quoting)."""
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [row["sentence"] for row in rows], [int(row["label"]) for row in rows]


def track_sst2(args: argparse.Namespace) -> MarginalTracker:
    import numpy as np
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from sinkhorn_hf.training.callbacks import AttentionMarginalsCallback

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2, attn_implementation="sdpa")
    sentences, labels = read_sst2(args.train_file)
    chosen = np.random.default_rng(args.seed).permutation(len(sentences))[: args.max_train_samples]
    encoded = tokenizer([sentences[i] for i in chosen], truncation=True, max_length=args.max_length)
    train = [{"input_ids": ids, "labels": labels[i]} for ids, i in zip(encoded["input_ids"], chosen, strict=True)]
    dev_sentences, dev_labels = read_sst2(args.validation_file)
    dev = tokenizer(dev_sentences, truncation=True, max_length=args.max_length)
    dev = [{"input_ids": ids, "labels": label} for ids, label in zip(dev["input_ids"], dev_labels, strict=True)]
    eval_batch = tokenizer(dev_sentences[:32], padding=True, truncation=True, max_length=args.max_length,
                           return_tensors="pt")  # fmt: skip
    steps = math.ceil(len(train) / args.batch_size) * args.epochs
    title = (
        f"MiniLM-L6 fine-tuned on SST-2 ({len(train)} sentences, {steps} steps): SoftMax column sums, 32 dev sentences"
    )
    callback = AttentionMarginalsCallback(dict(eval_batch), args.every, args.out, title=title)
    training = TrainingArguments(
        output_dir=str(args.out / "trainer"),
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64,
        learning_rate=args.lr,
        warmup_steps=steps // 10,
        seed=args.seed,
        report_to=[],
        use_cpu=args.device == "cpu",
        save_strategy="no",
        logging_steps=args.every,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=train,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=[callback],
    )
    trainer.train()
    predictions = trainer.predict(dev)
    dev_accuracy = float((predictions.predictions.argmax(-1) == np.asarray(dev_labels)).mean() * 100)
    print(f"dev accuracy {dev_accuracy:.2f} % ({len(dev)} sentences)", file=sys.stderr)
    (args.out / "dev_accuracy.json").write_text(json.dumps({"dev_accuracy": dev_accuracy, "steps": steps}) + "\n")
    return callback.tracker


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    tasks = parser.add_subparsers(dest="task", required=True)
    mnist = tasks.add_parser("mnist", help="the Sinkformers MNIST ViT at K = 1")
    mnist.add_argument("--data", default="../shared/data/mnist/mnist.npz")
    mnist.add_argument("--patch-size", type=int, default=7)
    mnist.add_argument("--epochs", type=int, default=3)
    mnist.add_argument("--lr", type=float, default=1e-3)
    mnist.add_argument("--max-train-samples", type=int, default=None)
    sst2 = tasks.add_parser("sst2", help="MiniLM fine-tuning on SST-2 with transformers.Trainer")
    sst2.add_argument("--model", default="../shared/models/all-MiniLM-L6-v2")
    sst2.add_argument("--train-file", type=Path, default=Path("../shared/data/glue/SST-2/train.tsv"))
    sst2.add_argument("--validation-file", type=Path, default=Path("../shared/data/glue/SST-2/dev.tsv"))
    sst2.add_argument("--max-train-samples", type=int, default=4800)
    sst2.add_argument("--max-length", type=int, default=64)
    sst2.add_argument("--batch-size", type=int, default=16)
    sst2.add_argument("--epochs", type=int, default=1)
    sst2.add_argument("--lr", type=float, default=5e-5)
    for task in (mnist, sst2):
        task.add_argument("--every", type=int, default=100, help="track every N optimizer steps")
        task.add_argument("--seed", type=int, default=0)
        task.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        task.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.every < 1 or args.epochs < 1:
        parser.error("--every and --epochs must be ≥ 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    tracker = track_mnist(args) if args.task == "mnist" else track_sst2(args)
    paths = tracker.write(args.out)
    for record in (tracker.records[0], tracker.records[-1]):
        values = ", ".join(f"{layer['softmax_column_std']:.4f}" for layer in record["layers"])
        print(f"step {record['step']}: std of SoftMax column sums per layer: {values}")
    print(f"wrote {paths['json']} and {paths['png']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
