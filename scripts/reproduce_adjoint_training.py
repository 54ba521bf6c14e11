"""The adjoint paying off in a real training run (Sander, Ablin, Peyré, NeurIPS 2022, their CIFAR experiment, on
a ViT): ViTs trained from scratch on MNIST with residual scale 1/L at several depths L, by adjoint scheme.

    python scripts/reproduce_adjoint_training.py --data ../shared/data/mnist/mnist.npz --depths 8 16 32 \
        --schemes off checkpoint euler heun auto --seeds 0 1 2 --epochs 1 --max-train-samples 3000 --out runs/adj

Model: ``transformers.ViTForImageClassification`` from a config (28×28×1 images in 7×7 patches: 16 tokens + CLS,
hidden ``--hidden``, ``--heads`` heads, feed-forward 2×hidden, no dropout, SoftMax via sdpa), every residual branch
scaled by 1/L (``sinkhorn_hf.enable_adjoint(model, scheme, residual_scale="1/L")``; ``off`` = exact backprop of the
same 1/L model). Data as :mod:`reproduce_sinkformers` (normalised pixels, first ``--max-train-samples`` training
images, the whole or first ``--max-test-samples`` test images); Adam, lr ``--lr``, batch ``--batch-size``, seeded
initialisation and shuffling; test accuracy after the last epoch.

Each run is trained in its own process, so that its memory is its own: peak activation memory is measured as
``scripts/bench_memory.py`` does, on the second training step (after the first has allocated gradients and Adam
state, and ``auto`` has probed): on CPU the kernel's resident high-water mark (VmHWM, reset through
/proc/self/clear_refs, glibc returning freed memory at once) minus the resident memory just before the step; on
CUDA torch.cuda.max_memory_allocated minus the allocated memory before it. Step time: median over every training
step of the run. Each finished run is written atomically to OUT/runs/<run>.json and OUT/results.json (``settings``,
``runs``, ``summary``: mean ± sample std over seeds per (depth, scheme)) is rebuilt from them, so a killed grid
resumes without redoing finished runs (and refuses other settings). Prints the summary table and writes
OUT/accuracy_vs_depth.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from experiment_files import markdown_table, write_grid_results

from sinkhorn_hf.atomic_files import save_figure_atomic, write_json_atomic

SCHEMES = ("off", "checkpoint", "euler", "heun", "auto")
TEST_BATCH = 1000
_MIB = 2**20


def _rss_bytes(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def build_model(depth: int, hidden: int, heads: int, image_size: int, patch_size: int):
    """A SoftMax ViT classifier (10 classes, 1 channel) of ``depth`` layers, random init, no dropout."""
    from transformers import AutoModelForImageClassification, ViTConfig

    config = ViTConfig(
        image_size=image_size,
        patch_size=patch_size,
        num_channels=1,
        hidden_size=hidden,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        num_hidden_layers=depth,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=10,
    )
    return AutoModelForImageClassification.from_config(config, attn_implementation="sdpa")


class PeakMemory:
    """Peak memory of one block of work above what was held when it started (bytes), as bench_memory measures."""

    def __init__(self, device) -> None:
        import torch

        self.torch, self.cuda = torch, device.type == "cuda"

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.base = self.torch.cuda.memory_allocated()
            self.torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
            self.base = _rss_bytes("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
        peak = self.torch.cuda.max_memory_allocated() if self.cuda else _rss_bytes("VmHWM")
        self.bytes = peak - self.base


def train_run(run: dict, settings: dict, device_name: str) -> dict:
    """Train one (depth, scheme, seed) run in this process; returns it with accuracy, memory and timings."""
    import torch
    from reproduce_sinkformers import load_mnist, to_tensors

    import sinkhorn_hf

    device = torch.device(device_name)
    arrays = load_mnist(settings["data_path"])
    train, test = slice(None, settings["max_train_samples"]), slice(None, settings["max_test_samples"])
    x_train, y_train = to_tensors(arrays["x_train"][train], arrays["y_train"][train], device_name)
    x_test, y_test = to_tensors(arrays["x_test"][test], arrays["y_test"][test], device_name)
    torch.manual_seed(run["seed"])
    model = build_model(run["depth"], settings["hidden"], settings["heads"], x_train.shape[-1], settings["patch_size"])
    model.to(device).train()
    stacks = sinkhorn_hf.enable_adjoint(model, scheme=run["scheme"], residual_scale="1/L")
    optimizer = torch.optim.Adam(model.parameters(), lr=settings["lr"])
    shuffle = torch.Generator().manual_seed(run["seed"])

    def step(batch) -> float:
        loss = torch.nn.functional.cross_entropy(model(pixel_values=x_train[batch]).logits, y_train[batch])
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated: outside the measured activations
        loss.backward()
        optimizer.step()
        return loss.item()

    times, losses, peak, start = [], [], None, time.perf_counter()
    for _ in range(run["epochs"]):
        model.train()
        for batch in torch.randperm(len(x_train), generator=shuffle).to(device).split(settings["train_batch"]):
            began = time.perf_counter()
            if len(times) == 1:
                with PeakMemory(device) as memory:
                    losses.append(step(batch))
                peak = memory.bytes
            else:
                losses.append(step(batch))
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - began)
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        correct = sum(
            (model(pixel_values=x_test[i : i + TEST_BATCH]).logits.argmax(-1) == y_test[i : i + TEST_BATCH]).sum()
            for i in range(0, len(x_test), TEST_BATCH)
        )
    test_accuracy = 100.0 * float(correct) / len(x_test)
    anchors = sorted(stacks[0].anchors) if stacks else []
    return {
        **run,
        "test_accuracy": test_accuracy,
        "final_train_loss": statistics.fmean(losses[-10:]),
        "finite": all(math.isfinite(loss) for loss in losses),
        "peak_activation_bytes": peak,
        "step_seconds": statistics.median(times),
        "train_seconds": seconds,
        "steps": len(times),
        "anchors": anchors,
        "device": device_name,
        "finished_at": time.time(),
    }


def run_name(run: dict) -> str:
    return f"L{run['depth']}_{run['scheme']}_seed{run['seed']}"


def summarise(runs: list[dict]) -> list[dict]:
    """Mean and sample std (0 for one seed) over seeds per (depth, scheme), in the schemes' order."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["depth"], SCHEMES.index(run["scheme"])), []).append(run)
    rows = []
    for (depth, index), members in sorted(groups.items()):
        row = {"depth": depth, "scheme": SCHEMES[index], "seeds": len(members)}
        for metric in ("test_accuracy", "peak_activation_bytes", "step_seconds"):
            values = [member[metric] for member in members]
            row[f"{metric}_mean"] = statistics.fmean(values)
            row[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        row["diverged"] = sum(not member["finite"] for member in members)
        rows.append(row)
    return rows


def table(summary: list[dict]) -> str:
    """The summary as a Markdown table; memory and step time also as × exact backprop (off) at that depth."""
    off = {row["depth"]: row for row in summary if row["scheme"] == "off"}
    header = ["L", "scheme", "seeds", "test acc (%)", "peak activation MiB (× off)", "step s (× off)"]
    rows = []
    for row in summary:
        base = off.get(row["depth"])
        memory, seconds = row["peak_activation_bytes_mean"], row["step_seconds_mean"]
        memory_ratio = (
            f" ({memory / base['peak_activation_bytes_mean']:.2f})"
            if base and base["peak_activation_bytes_mean"] > 0
            else ""
        )
        time_ratio = f" ({seconds / base['step_seconds_mean']:.2f})" if base else ""
        diverged = f", {row['diverged']} diverged" if row["diverged"] else ""
        rows.append(
            [
                str(row["depth"]),
                row["scheme"],
                f"{row['seeds']}{diverged}",
                f"{row['test_accuracy_mean']:.2f} ± {row['test_accuracy_std']:.2f}",
                f"{memory / _MIB:.1f} ± {row['peak_activation_bytes_std'] / _MIB:.1f}{memory_ratio}",
                f"{seconds:.3f} ± {row['step_seconds_std']:.3f}{time_ratio}",
            ]
        )
    return markdown_table(header, rows)


def plot(summary: list[dict], settings: dict, path: Path) -> None:
    """Test accuracy, peak activation memory and step time vs depth, one line per scheme (error bars: std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    metrics = (
        ("test_accuracy", 1, "test accuracy (%)"),
        ("peak_activation_bytes", _MIB, "peak activation memory (MiB)"),
        ("step_seconds", 1, "step time (s)"),
    )
    depths = sorted({row["depth"] for row in summary})
    for ax, (metric, unit, label) in zip(axes, metrics, strict=True):
        for scheme in SCHEMES:
            rows = [row for row in summary if row["scheme"] == scheme]
            if rows:
                ax.errorbar(
                    [row["depth"] for row in rows],
                    [row[f"{metric}_mean"] / unit for row in rows],
                    yerr=[row[f"{metric}_std"] / unit for row in rows],
                    marker="o",
                    capsize=3,
                    label="off (exact backprop)" if scheme == "off" else scheme,
                )
        ax.set_xscale("log", base=2)
        ax.set_xticks(depths, [str(d) for d in depths])
        ax.set_xlabel("depth L (residual scale 1/L)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    figure.suptitle(
        f"ViT (hidden {settings['hidden']}, {settings['heads']} heads, patch {settings['patch_size']}) on MNIST: "
        f"{settings['train_samples']} train images, {settings['epochs']} epoch(s), device {settings['device']}"
    )
    figure.tight_layout()
    save_figure_atomic(figure, path, dpi=120)


def run_in_subprocess(run: dict, settings: dict, out: Path) -> dict:
    """Train ``run`` in a fresh process (its own memory), which writes OUT/runs/<run>.json; returns that record."""
    record_path = out / "runs" / f"{run_name(run)}.json"
    command = [sys.executable, __file__, "--worker", json.dumps(run), "--out", str(out)]
    # Freed tensors go back to the system at once, so resident memory tracks live tensors (as bench_memory).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not record_path.is_file():
        raise RuntimeError(f"run {run_name(run)} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(record_path.read_text())


def finished_runs(out: Path, settings: dict) -> list[dict]:
    """Runs already recorded under ``out`` (none if new); refuses a folder written with other settings."""
    settings_path = out / "settings.json"
    if settings_path.exists():
        previous = json.loads(settings_path.read_text())
        if previous != settings:
            differences = ", ".join(
                f"{key}: {previous.get(key)!r} there, {settings.get(key)!r} now"
                for key in sorted(set(previous) | set(settings))
                if previous.get(key) != settings.get(key)
            )
            raise SystemExit(f"{out} holds runs made with other settings ({differences}); pass another --out.")
    else:
        write_json_atomic(settings_path, settings, indent=1)
    return [json.loads(path.read_text()) for path in sorted((out / "runs").glob("*.json"))]


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/mnist/mnist.npz", help="Keras-layout .npz or Hub name")
    parser.add_argument("--depths", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-train-samples", type=int, default=None, help="use the first N training images")
    parser.add_argument("--max-test-samples", type=int, default=None, help="use the first N test images")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--patch-size", type=int, default=7)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--out", type=Path, default=Path("runs/adjoint_training"), help="output folder")
    parser.add_argument("--worker", metavar="RUN_JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("depths", "schemes", "seeds"):
        values = getattr(args, name)
        if len(set(values)) != len(values):
            parser.error(f"--{name} must be distinct: {values}")
    if min(args.depths) < 1 or min(args.seeds) < 0:
        parser.error(f"--depths must be ≥ 1 and --seeds ≥ 0, got {args.depths} and {args.seeds}")
    for name in ("epochs", "max_train_samples", "max_test_samples", "hidden", "heads", "patch_size", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be ≥ 1, got {value}")
    if args.hidden % args.heads:
        parser.error(f"--hidden ({args.hidden}) must be a multiple of --heads ({args.heads})")
    if not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    settings_path = args.out / "settings.json"
    if args.worker:
        run, settings = json.loads(args.worker), json.loads(settings_path.read_text())
        record = train_run(run, settings, settings["device"])
        write_json_atomic(args.out / "runs" / f"{run_name(run)}.json", record, indent=1)
        return 0
    import numpy as np
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not Path(args.data).is_file():
        raise SystemExit(f"--data {args.data}: no such .npz (expected keys x_train, y_train, x_test, y_test)")
    with np.load(args.data) as arrays:
        n_train, n_test, size = len(arrays["y_train"]), len(arrays["y_test"]), arrays["x_train"].shape[-1]
    if size % args.patch_size:
        raise SystemExit(f"--patch-size {args.patch_size} must divide the image size {size}")
    train_samples = min(n_train, args.max_train_samples or n_train)
    if math.ceil(train_samples / args.batch_size) * args.epochs < 2:
        raise SystemExit(
            f"{train_samples} training images × {args.epochs} epoch(s) is one step: memory is measured on"
            f" the second, so give at least {args.batch_size + 1} images or 2 epochs"
        )
    settings = {
        "data": os.path.basename(args.data),
        "data_path": str(Path(args.data).resolve()),
        "train_samples": train_samples,
        "test_samples": min(n_test, args.max_test_samples or n_test),
        "max_train_samples": args.max_train_samples,
        "max_test_samples": args.max_test_samples,
        "epochs": args.epochs,
        "lr": args.lr,
        "hidden": args.hidden,
        "heads": args.heads,
        "patch_size": args.patch_size,
        "train_batch": args.batch_size,
        "residual_scale": "1/L",
        "device": device,
        "memory": "peak RSS (CPU) / max_memory_allocated (CUDA) of training step 2 minus the memory held before it",
    }
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    runs = finished_runs(args.out, settings)
    done = {run_name(run) for run in runs}
    grid = [
        {"depth": depth, "scheme": scheme, "seed": seed, "epochs": args.epochs}
        for seed in args.seeds  # seed-major: a cut-short grid has every configuration once first
        for depth in args.depths
        for scheme in args.schemes
    ]
    todo = [run for run in grid if run_name(run) not in done]
    print(f"{len(done)} finished run(s) in {args.out}/runs, {len(todo)} to do", file=sys.stderr)
    results = args.out / "results.json"
    for index, run in enumerate(todo, 1):
        record = run_in_subprocess(run, settings, args.out)
        runs.append(record)
        write_grid_results(results, settings, runs, summarise)
        print(
            f"[{index}/{len(todo)}] {run_name(run)}: test acc {record['test_accuracy']:.2f} %, "
            f"peak {record['peak_activation_bytes'] / _MIB:.1f} MiB, step {record['step_seconds']:.3f} s, "
            f"{record['train_seconds']:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    summary = write_grid_results(results, settings, runs, summarise)
    print(table(summary), end="")
    plot(summary, settings, args.out / "accuracy_vs_depth.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
