"""Reproduce the Sinkformers MNIST ViT experiment (Sander et al., AISTATS 2022, Fig. 7): test accuracy vs patch
size of an attention-only ViT with SoftMax (K = 1) and Sinkhorn (K > 1) attention.

    python scripts/reproduce_sinkformers.py --data ../shared/data/mnist/mnist.npz --lr paper 1e-3 --out runs/sinkformers

Protocol of the authors' ``vit-pytorch/one_expe_mnist.py``: the model of :mod:`sinkformers_vit` (hidden 128,
depth 1, 1 head of dim 64, no feed-forward), pixels normalised by MNIST's mean 0.1307 and std 0.3081, Adam, batch
100, 45 epochs, test accuracy after every epoch (batch 1000), lr divided by 10 from epoch 35 and again from 41.
For E = ``--epochs`` other than 45 the milestones keep their place in training: the lr is divided by 10 from
epoch round(34·E/45) + 1 and again from round(40·E/45) + 1 (1-indexed; 35 and 41 for E = 45; the two coincide for
small E, and a milestone past E never happens). ``--lr`` takes arms: ``paper`` (1e-3 for K = 1, 2e-3 for K > 1,
as the authors ran K = 1 and K = 5) and/or numbers (that lr for every K: the same-lr control, since the paper
changed K and the lr at once). A run is (K, patch size, seed, lr), so a run two arms share is trained once.
The authors do not seed; here the seed fixes the initialisation and the shuffling.

Writes OUT/results.json (``settings``, ``runs``, ``summary``: mean ± sample std over seeds per (K, patch, lr)),
rewritten atomically after every finished run; a rerun skips finished runs and refuses other settings.
Then prints the summary table and writes OUT/accuracy_vs_patch_size.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from experiment_files import markdown_table, write_grid_results
from sinkformers_vit import AttentionOnlyViT
from torch import Tensor
from tqdm import tqdm

from sinkhorn_hf.atomic_files import save_figure_atomic

PAPER_EPOCHS, PAPER_MILESTONES = 45, (34, 40)  # epochs done before each /10 in the authors' schedule
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
TRAIN_BATCH, TEST_BATCH = 100, 1000


def paper_lr(iterations: int) -> float:
    """The authors' lr: 1e-3 for SoftMax (K = 1), 2e-3 for Sinkhorn (they ran K = 5; used for every K > 1)."""
    return 1e-3 if iterations == 1 else 2e-3


def milestones(epochs: int) -> list[int]:
    """Epochs completed before each lr /10 (MultiStepLR milestones): the paper's 34 and 40 of 45, scaled."""
    return [round(done * epochs / PAPER_EPOCHS) for done in PAPER_MILESTONES]


def lr_arm(token: str) -> str | float:
    """``paper`` or a positive float (argparse type)."""
    if token == "paper":
        return token
    try:
        value = float(token)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise argparse.ArgumentTypeError(f"an lr arm is 'paper' or a positive number, got {token!r}")
    return value


def load_mnist(data: str) -> dict[str, np.ndarray]:
    """x_train (N, 28, 28) uint8, y_train (N,), x_test, y_test from a Keras-layout .npz or a Hub dataset name
    (``datasets.load_dataset``, splits train/test, columns image/label)."""
    if data.endswith(".npz"):
        if not Path(data).is_file():
            raise SystemExit(f"--data {data}: no such .npz (expected keys x_train, y_train, x_test, y_test)")
        with np.load(data) as arrays:
            missing = {"x_train", "y_train", "x_test", "y_test"} - set(arrays.files)
            if missing:
                raise SystemExit(f"--data {data} lacks the arrays {sorted(missing)} (it has {arrays.files})")
            return {name: arrays[name] for name in ("x_train", "y_train", "x_test", "y_test")}
    from datasets import load_dataset

    splits = load_dataset(data)
    arrays = {}
    for split in ("train", "test"):
        if split not in splits or not {"image", "label"} <= set(splits[split].column_names):
            raise SystemExit(f"--data {data}: expected splits train/test with columns image, label")
        arrays[f"x_{split}"] = np.stack([np.asarray(image, dtype=np.uint8) for image in splits[split]["image"]])
        arrays[f"y_{split}"] = np.asarray(splits[split]["label"])
    return arrays


def to_tensors(images: np.ndarray, labels: np.ndarray, device: str) -> tuple[Tensor, Tensor]:
    """uint8 (N, H, W) → normalised float (N, 1, H, W), labels int64 (N,)."""
    x = (torch.from_numpy(images).float().div(255.0) - MNIST_MEAN) / MNIST_STD
    return x.unsqueeze(1).to(device), torch.from_numpy(labels.astype(np.int64)).to(device)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: Tensor, y: Tensor) -> float:
    """Test accuracy in percent, batches of TEST_BATCH."""
    model.eval()
    correct = sum(
        (model(x[i : i + TEST_BATCH]).argmax(-1) == y[i : i + TEST_BATCH]).sum().item()
        for i in range(0, len(x), TEST_BATCH)
    )
    return 100.0 * correct / len(x)


def train_run(run: dict, data: dict[str, Tensor], device: str) -> dict:
    """Train one (iterations, patch_size, seed, lr, epochs) run; returns it with its accuracies filled in."""
    torch.manual_seed(run["seed"])
    model = AttentionOnlyViT(run["patch_size"], run["iterations"], image_size=data["x_train"].shape[-1]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=run["lr"])
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones(run["epochs"]), gamma=0.1)
    shuffle = torch.Generator().manual_seed(run["seed"])
    n_train = len(data["x_train"])
    accuracies, losses, lrs, start = [], [], [], time.perf_counter()
    label = f"K={run['iterations']} p={run['patch_size']} seed={run['seed']} lr={run['lr']:g}"
    with tqdm(total=run["epochs"] * math.ceil(n_train / TRAIN_BATCH), desc=label, mininterval=10) as bar:
        for _ in range(run["epochs"]):
            model.train()
            lrs.append(optimizer.param_groups[0]["lr"])
            total = 0.0
            for batch in torch.randperm(n_train, generator=shuffle).to(device).split(TRAIN_BATCH):
                loss = torch.nn.functional.cross_entropy(model(data["x_train"][batch]), data["y_train"][batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item() * len(batch)
                bar.update()
            schedule.step()
            losses.append(total / n_train)
            accuracies.append(accuracy(model, data["x_test"], data["y_test"]))
            bar.set_postfix(test_acc=f"{accuracies[-1]:.2f}")
    seconds = time.perf_counter() - start
    return {
        **run,
        "best_test_accuracy": max(accuracies),
        "best_epoch": accuracies.index(max(accuracies)) + 1,
        "final_test_accuracy": accuracies[-1],
        "test_accuracy": accuracies,
        "train_loss": losses,
        "lr_per_epoch": lrs,
        "seconds": seconds,
        "seconds_per_epoch": seconds / run["epochs"],
        "device": device,
        "finished_at": time.time(),
    }


def summarise(runs: list[dict]) -> list[dict]:
    """Mean and sample std (0 for one seed) of best and final test accuracy per (iterations, patch_size, lr)."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["iterations"], run["patch_size"], run["lr"]), []).append(run)
    rows = []
    for (iterations, patch_size, lr), members in sorted(groups.items()):
        row = {"iterations": iterations, "patch_size": patch_size, "lr": lr, "seeds": len(members)}
        for metric in ("best_test_accuracy", "final_test_accuracy"):
            values = [member[metric] for member in members]
            row[f"{metric}_mean"] = statistics.fmean(values)
            row[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def table(summary: list[dict]) -> str:
    """The summary as a Markdown table."""
    header = ["K", "patch", "lr", "seeds", "best test acc (%)", "final test acc (%)"]
    rows = [
        [
            str(row["iterations"]),
            str(row["patch_size"]),
            f"{row['lr']:g}",
            str(row["seeds"]),
            f"{row['best_test_accuracy_mean']:.2f} ± {row['best_test_accuracy_std']:.2f}",
            f"{row['final_test_accuracy_mean']:.2f} ± {row['final_test_accuracy_std']:.2f}",
        ]
        for row in summary
    ]
    return markdown_table(header, rows)


def plot(summary: list[dict], settings: dict, path: Path) -> None:
    """Best and final test accuracy vs patch size, one line per (K, lr), error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    lines = sorted({(row["iterations"], row["lr"]) for row in summary})
    for ax, metric, title in zip(axes, ("best", "final"), ("best over epochs", "final epoch"), strict=True):
        for iterations, lr in lines:
            rows = [row for row in summary if (row["iterations"], row["lr"]) == (iterations, lr)]
            ax.errorbar(
                [row["patch_size"] for row in rows],
                [row[f"{metric}_test_accuracy_mean"] for row in rows],
                yerr=[row[f"{metric}_test_accuracy_std"] for row in rows],
                marker="o",
                capsize=3,
                label=f"K={iterations}" + (" (SoftMax)" if iterations == 1 else "") + f", lr {lr:g}",
            )
        ax.set_xscale("log", base=2)
        patches = sorted({row["patch_size"] for row in summary})
        ax.set_xticks(patches, [str(p) for p in patches])
        ax.set_xlabel("patch size")
        ax.set_title(f"test accuracy, {title}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].legend()
    train = settings["max_train_samples"] or "all"
    figure.suptitle(f"attention-only ViT on MNIST, {settings['epochs']} epochs, train samples: {train}")
    figure.tight_layout()
    save_figure_atomic(figure, path, dpi=120)


def recorded_runs(path: Path, settings: dict) -> list[dict]:
    """Runs already in ``path`` (none if it does not exist); refuses a file written with other settings."""
    if not path.exists():
        return []
    try:
        previous = json.loads(path.read_text())
        previous_settings, runs = previous["settings"], previous["runs"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise SystemExit(f"{path} is not a results file of this script ({error}); use another --out") from error
    if previous_settings != settings:
        differences = ", ".join(
            f"{key}: {previous_settings.get(key)!r} there, {settings.get(key)!r} now"
            for key in sorted(set(previous_settings) | set(settings))
            if previous_settings.get(key) != settings.get(key)
        )
        raise SystemExit(
            f"{path} holds runs made with other settings ({differences}); refusing to mix them. "
            "Rerun with the same settings to resume, or pass another --out."
        )
    return runs


def grid(args: argparse.Namespace) -> list[dict]:
    """The distinct runs asked for, seed-major so that a cut-short grid has every configuration once first."""
    runs, seen = [], set()
    for seed in args.seeds:
        for patch_size in args.patch_sizes:
            for arm in args.lr:
                for iterations in args.iterations:
                    lr = paper_lr(iterations) if arm == "paper" else arm
                    run = {"iterations": iterations, "patch_size": patch_size, "seed": seed, "lr": lr}
                    if run_key(run) not in seen:
                        seen.add(run_key(run))
                        runs.append(run | {"epochs": args.epochs})
    return runs


def run_key(run: dict) -> tuple:
    return run["iterations"], run["patch_size"], run["seed"], run["lr"]


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/mnist/mnist.npz", help="Keras-layout .npz or Hub name")
    parser.add_argument("--patch-sizes", type=int, nargs="+", default=[1, 2, 4, 7, 14, 28])
    parser.add_argument("--iterations", type=int, nargs="+", default=[1, 3, 5], help="Sinkhorn K (1 = SoftMax)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=PAPER_EPOCHS)
    parser.add_argument(
        "--lr", type=lr_arm, nargs="+", default=["paper"], help="arms: 'paper' (per-K lrs) and/or a shared lr"
    )
    parser.add_argument("--max-train-samples", type=int, default=None, help="use the first N training images")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/sinkformers"), help="output folder")
    args = parser.parse_args(argv)
    for name in ("patch_sizes", "iterations", "seeds"):
        values = getattr(args, name)
        if len(set(values)) != len(values) or min(values) < (0 if name == "seeds" else 1):
            parser.error(f"--{name.replace('_', '-')} must be distinct, non-negative (K, patch ≥ 1): {values}")
    if args.epochs < 1 or (args.max_train_samples is not None and args.max_train_samples < 1):
        parser.error("--epochs and --max-train-samples must be ≥ 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    arrays = load_mnist(args.data)
    size = arrays["x_train"].shape[-1]
    if any(size % p for p in args.patch_sizes):
        raise SystemExit(f"--patch-sizes {args.patch_sizes}: each must divide the image size {size}")
    train = slice(None, args.max_train_samples)
    settings = {
        "data": os.path.basename(args.data),
        "train_samples": len(arrays["x_train"][train]),
        "test_samples": len(arrays["x_test"]),
        "max_train_samples": args.max_train_samples,
        "epochs": args.epochs,
        "lr_milestones": milestones(args.epochs),
        "train_batch": TRAIN_BATCH,
        "test_batch": TEST_BATCH,
        "model": "AttentionOnlyViT(hidden 128, depth 1, 1 head of dim 64, no feed-forward)",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.json"
    runs = recorded_runs(results, settings)
    done = {run_key(run) for run in runs}
    todo = [run for run in grid(args) if run_key(run) not in done]
    print(f"{len(done)} finished run(s) in {results}, {len(todo)} to do", file=sys.stderr)
    data = {}
    for split, rows in (("train", train), ("test", slice(None))):
        data[f"x_{split}"], data[f"y_{split}"] = to_tensors(
            arrays[f"x_{split}"][rows], arrays[f"y_{split}"][rows], args.device
        )
    for run in todo:
        runs.append(train_run(run, data, args.device))
        write_grid_results(results, settings, runs, summarise)
    summary = write_grid_results(results, settings, runs, summarise)
    print(table(summary), end="")
    plot(summary, settings, args.out / "accuracy_vs_patch_size.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
