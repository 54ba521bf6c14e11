"""``sinkhorn-hf demo``: the main job in miniature. A small ViT trained from scratch on scikit-learn's 8x8
digits (shipped with scikit-learn, no download) through the project's trainer, SoftMax and Sinkhorn side by
side on the same seed and data; then test accuracy, attention marginals and a plot.

Everything is built in a hidden staging folder inside the output directory and moved into place at the end,
so a failed or interrupted run leaves an earlier demo's output as it was.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from . import add_command, fail

DEFAULT_OUTPUT_DIR = "sinkhorn-demo"
MANIFEST = "demo.json"  # written last; its presence marks a folder as a demo output that a rerun may replace
DATA_FILE = "digits.npz"
PLOT_FILE = "column_spread.png"
ARMS = ("softmax", "sinkhorn")  # one run directory each, holding the model and results.json
ENTRIES = (DATA_FILE, *ARMS, PLOT_FILE, MANIFEST)  # everything the demo writes at the top of its folder
_STAGING_PREFIX = ".demo-staging-"
SPLIT_SEED = 0  # the train/test split never changes, so digits.npz is the same file for every --seed
TEST_FRACTION = 0.2
MARGINAL_BATCH = 128  # test images the marginals are measured on
VIT_CONFIG = (
    "image_size=8,patch_size=2,num_channels=1,hidden_size=64,num_hidden_layers=2,num_attention_heads=4,"
    "intermediate_size=128"
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers,
        "demo",
        run,
        help="train a small ViT on 8x8 digits with SoftMax and with Sinkhorn attention and compare them",
        description="Train a 2-layer ViT from scratch on scikit-learn's 8x8 digits (offline) twice, with SoftMax "
        "(sdpa) and with Sinkhorn attention, same seed and data; print both test accuracies and the per-layer "
        "row/column sums of attention on a test batch, and write each run's results.json and a plot.",
    )
    parser.add_argument(
        "--output_dir",
        type=Path,
        default=Path(DEFAULT_OUTPUT_DIR),
        help=f"where the runs, results.json files and plot go (default: ./{DEFAULT_OUTPUT_DIR}); must be empty, "
        "new, or an earlier demo output, unless --overwrite",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty folder that is not an earlier demo output (only the demo's own entries "
        f"{', '.join(ENTRIES)} are replaced; nothing else there is touched)",
    )
    parser.add_argument("--sinkhorn_iterations", type=int, default=3, help="K of the Sinkhorn arm (default 3)")
    parser.add_argument("--num_train_epochs", type=int, default=8)
    parser.add_argument("--max_train_samples", type=int, default=None, help="train on a seeded subset (tests)")
    parser.add_argument("--seed", type=int, default=0, help="seed of both arms (initialisation and data order)")


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuse a file, or a non-empty folder that is not an earlier demo output, unless ``overwrite``."""
    if output_dir.exists() and not output_dir.is_dir():
        fail(f"--output_dir {output_dir} exists and is not a directory")
    if overwrite or not output_dir.is_dir():
        return
    entries = {p.name for p in output_dir.iterdir() if not p.name.startswith(_STAGING_PREFIX)}
    if not entries:
        return
    if MANIFEST in entries and _is_manifest(output_dir / MANIFEST) and entries <= set(ENTRIES):
        return
    foreign = sorted(entries - set(ENTRIES)) or sorted(entries)
    fail(
        f"--output_dir {output_dir} is not empty and is not an earlier demo output (it holds {', '.join(foreign[:5])}"
        f"{', ...' if len(foreign) > 5 else ''}); choose another folder, or pass --overwrite to replace only the "
        f"demo's own entries ({', '.join(ENTRIES)}) there",
    )


def _is_manifest(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("written_by") == "sinkhorn-hf demo"
    except (OSError, ValueError, AttributeError):
        return False


def write_digits(path: Path) -> dict[str, int]:
    """scikit-learn's 8x8 digits as uint8 images (0..16 scaled to 0..255) in an .npz the images task reads,
    split into x_train/y_train and x_test/y_test (stratified, seed SPLIT_SEED). Returns the split sizes."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=digits.target
    )
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return {"train": len(y_train), "test": len(y_test)}


def train_arm(arm: str, data_file: Path, output_dir: Path, args: argparse.Namespace) -> Any:
    """One run of the images task (the ``run_image_classification`` script's path) into ``output_dir``."""
    from ..training.arguments import ModelArguments, TrainerArguments
    from ..training.run import run_task
    from ..training.tasks.images import IMAGES, ImageDataArguments

    model_args = ModelArguments(
        model_type="vit",
        config_overrides=VIT_CONFIG,
        attn_implementation="sdpa" if arm == "softmax" else "sinkhorn",
        sinkhorn_iterations=args.sinkhorn_iterations,
    )
    data_args = ImageDataArguments(train_file=str(data_file), max_train_samples=args.max_train_samples)
    trainer_args = TrainerArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=32,
        per_device_eval_batch_size=128,
        learning_rate=3e-3,
        warmup_ratio=0.1,
        num_train_epochs=args.num_train_epochs,
        logging_steps=10,
        seed=args.seed,
    )
    return run_task(IMAGES, model_args, data_args, trainer_args)


def arm_marginals(arm: str, run_dir: Path, data_file: Path) -> Any:
    """Row/column sums of the trained model's attention on the first MARGINAL_BATCH test images: SoftMax
    weights for the SoftMax arm (eager attention), the Sinkhorn weights for the Sinkhorn arm."""
    import numpy as np
    import torch
    from transformers import AutoModelForImageClassification

    from ..attention.diagnostics import marginal_report, softmax_marginals
    from ..training.tasks.images import IMAGES

    attention = "sdpa" if arm == "softmax" else "sinkhorn"
    model = AutoModelForImageClassification.from_pretrained(run_dir, attn_implementation=attention).eval()
    with np.load(data_file) as arrays:
        images, labels = arrays["x_test"][:MARGINAL_BATCH], arrays["y_test"][:MARGINAL_BATCH]
    rows = [{"image": image, "labels": label} for image, label in zip(images, labels, strict=True)]
    collate = IMAGES.collator(IMAGES.default_processor(model.config), model.config)
    pixel_values = collate(rows)["pixel_values"]
    if arm == "softmax":
        return softmax_marginals(model, pixel_values=pixel_values)
    with torch.no_grad():
        return marginal_report(model(pixel_values=pixel_values, output_attentions=True).attentions)


def _move_into(staging: Path, output_dir: Path) -> None:
    """Move the staged entries over the demo's own entries in ``output_dir``, the manifest last (until then an
    earlier demo's manifest still marks the folder as a demo output)."""
    for name in sorted(ENTRIES, key=lambda name: name == MANIFEST):
        target, source = output_dir / name, staging / name
        if not source.exists():
            continue
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.replace(source, target)


def run(args: argparse.Namespace) -> int:
    import torch

    import sinkhorn_hf  # noqa: F401  (registers "sinkhorn")

    from ..attention.diagnostics import plot_column_spread
    from ..attention.settings import SinkhornSettings

    try:
        SinkhornSettings(iterations=args.sinkhorn_iterations)
    except ValueError as error:
        fail(error, usage=True)
    for flag in ("num_train_epochs", "max_train_samples"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            fail(f"--{flag} must be >= 1, got {value}", usage=True)
    output_dir = args.output_dir
    check_output_dir(output_dir, args.overwrite)
    created = not output_dir.exists()
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=output_dir))
    labels = {"softmax": "SoftMax (sdpa)", "sinkhorn": f"Sinkhorn K={args.sinkhorn_iterations}"}
    started = time.perf_counter()
    # Matrices this small gain nothing from intra-op threads, and on a busy machine the threads' hand-offs made
    # the demo 8x slower (measured: 385 s with 2 threads vs 47 s with 1, load 6 on 2 cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        split = write_digits(staging / DATA_FILE)
        # Moved into place first so that results.json names a file that stays (the split never changes).
        data_file = output_dir / DATA_FILE
        os.replace(staging / DATA_FILE, data_file)
        print(
            f"8x8 digits (scikit-learn): {split['train']} train / {split['test']} test images (split seed "
            f"{SPLIT_SEED}); ViT 2 layers, 4 heads, hidden 64, 4x4 grid of 2x2 patches + CLS; seed {args.seed}"
        )
        results, reports = {}, {}
        for number, arm in enumerate(ARMS, 1):
            print(f"\n[{number}/{len(ARMS)}] training the {labels[arm]} arm")
            results[arm] = train_arm(arm, data_file, staging / arm, args)
            reports[arm] = arm_marginals(arm, staging / arm, data_file)
        plot_column_spread(
            {labels[arm]: reports[arm] for arm in ARMS},
            staging / PLOT_FILE,
            title=f"ViT on 8x8 digits: column-sum spread on {MARGINAL_BATCH} test images",
        )
        manifest = _manifest(args, labels, results, reports)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _move_into(staging, output_dir)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(staging, ignore_errors=True)
        if created and output_dir.is_dir() and not any(output_dir.iterdir()):
            output_dir.rmdir()
    _print_summary(results, reports, labels, split["test"], output_dir, time.perf_counter() - started)
    return 0


def _manifest(
    args: argparse.Namespace, labels: dict[str, str], results: dict[str, Any], reports: dict[str, Any]
) -> dict:
    """demo.json: what was run, both arms' accuracy and marginals, and where their files are."""
    return {
        "written_by": "sinkhorn-hf demo",
        "seed": args.seed,
        "split_seed": SPLIT_SEED,
        "vit_config": VIT_CONFIG,
        "arms": {
            arm: {
                "label": labels[arm],
                "test_accuracy": results[arm].metrics["accuracy"],
                "train_runtime_s": results[arm].train_runtime_s,
                "results": f"{arm}/results.json",
                "marginals": reports[arm].summary(),
            }
            for arm in ARMS
        },
        "plot": PLOT_FILE,
    }


def _print_summary(
    results: dict[str, Any], reports: dict[str, Any], labels: dict[str, str], n_test: int, output_dir: Path, wall: float
) -> None:
    width = max(len(label) for label in labels.values())
    print(f"\ntest accuracy on the {n_test} held-out digits:")
    for arm in ARMS:
        print(
            f"  {labels[arm]:<{width}}  {results[arm].metrics['accuracy']:.4f}  "
            f"(trained {results[arm].train_runtime_s:.1f} s)"
        )
    print(f"\nattention marginals on {MARGINAL_BATCH} test images (17 tokens), mean over heads; 0 = doubly stochastic:")
    print(f"  {'arm':<{width}}  layer  max|row sum-1|  max|col sum-1|  std(col sums)")
    for arm in ARMS:
        for row in reports[arm].summary():
            print(
                f"  {labels[arm]:<{width}}  {row['layer']:>5}  {row['row_error']:>14.2e}  "
                f"{row['column_error']:>14.2e}  {row['column_std']:>13.2e}"
            )
    print("\nwritten:")
    for name in (*(f"{arm}/results.json" for arm in ARMS), PLOT_FILE, MANIFEST):
        print(f"  {output_dir / name}")
    print(f"({wall:.0f} s)")
