"""Fine-tuning arms side by side on a GLUE task: full fine-tuning, LoRA and the adjoint schemes, same data, seeds and
settings, each arm a ``scripts/run_glue.py`` run in its own process.

    python scripts/compare_adjoint_finetuning.py --model ../shared/models/all-MiniLM-L6-v2 --task sst2 \
        --data ../shared/data/glue/SST-2 --arms full reversible-0.1 --seeds 42 43 44 --max_train_samples 2000 \
        --out runs/adjoint_arms

Per run: dev accuracy, final training loss and training time from the run's ``results.json``, and the peak resident
memory of its process (``wait4``'s ``ru_maxrss``: model, AdamW state and activations together). The arms that train
LoRA adapters use ``--lora_learning_rate`` (LoRA's usual, larger rate), the others ``--learning_rate``. A run is
done when ``OUT/TASK/ARM/seed_S/record.json`` exists, so a killed grid resumes where it stopped and several
instances may share OUT with different arms. Writes OUT/TASK/results.json and OUT/TASK/table.md (atomically;
mean ± standard deviation over seeds, difference to the ``full`` arm's mean) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from experiment_files import markdown_table, write_grid_results

from sinkhorn_hf.atomic_files import write_json_atomic, write_text_atomic

REVERSIBLE_SMALL = ["--adjoint", "reversible", "--adjoint_coupling", "0.1", "--adjoint_tolerance", "0.1"]
# arm -> the run_glue.py flags that make it
ARMS = {
    "full": [],
    "lora": ["--lora_r", "8"],
    "checkpoint": ["--adjoint", "checkpoint"],
    "auto": ["--adjoint", "auto"],
    "momentum": ["--adjoint", "momentum"],
    "reversible": ["--adjoint", "reversible"],
    "reversible-0.1": REVERSIBLE_SMALL,
    "reversible-0.1+lora": [*REVERSIBLE_SMALL, "--lora_r", "8"],
}
TASK_FILES = {"sst2": ("train.tsv", "dev.tsv"), "rte": ("train.tsv", "dev.tsv")}
RUN_GLUE = Path(__file__).with_name("run_glue.py")


def run_command(args: argparse.Namespace, arm: str, seed: int, output_dir: Path) -> list[str]:
    """The run_glue.py command line of one (arm, seed) run."""
    train, dev = (str(Path(args.data) / name) for name in TASK_FILES[args.task])
    learning_rate = args.lora_learning_rate if "--lora_r" in ARMS[arm] else args.learning_rate
    return [
        sys.executable, str(RUN_GLUE), "--model_name_or_path", args.model, "--task_name", args.task,
        "--train_file", train, "--validation_file", dev, "--max_train_samples", str(args.max_train_samples),
        "--max_length", "128", "--per_device_train_batch_size", "32", "--learning_rate", str(learning_rate),
        "--warmup_ratio", "0.06", "--num_train_epochs", "1", "--seed", str(seed), "--attn_implementation", "sdpa",
        "--logging_steps", "10", "--output_dir", str(output_dir), "--overwrite_output_dir", *ARMS[arm],
    ]  # fmt: skip


def run_one(args: argparse.Namespace, arm: str, seed: int) -> dict:
    """Run one (arm, seed) to completion in a child process; its record (raises with the log's tail on failure)."""
    output_dir = Path(args.out) / args.task / arm / f"seed_{seed}"
    output_dir.mkdir(parents=True, exist_ok=True)
    log = output_dir / "log.txt"
    with log.open("w") as stream:
        child = subprocess.Popen(run_command(args, arm, seed, output_dir), stdout=stream, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{arm} seed {seed} failed; the end of {log}:\n{log.read_text()[-3000:]}")
    results = json.loads((output_dir / "results.json").read_text())
    record = {
        "arm": arm,
        "seed": seed,
        "accuracy": results["metrics"]["accuracy"],
        "train_loss": results["train_loss"],
        "train_runtime_s": results["train_runtime_s"],
        "train_steps": results["train_steps"],
        "peak_rss_mb": usage.ru_maxrss / 1024,  # Linux reports KiB
    }
    write_json_atomic(output_dir / "record.json", record)  # its existence marks the run done: never half of one
    return record


def summarise(runs: list[dict]) -> list[dict]:
    """Per arm (in ARMS order): accuracy mean ± standard deviation over seeds, its difference to ``full``'s mean,
    the mean peak RSS and time per training step."""
    by_arm = {arm: [r for r in runs if r["arm"] == arm] for arm in ARMS}
    full = by_arm["full"]
    full_mean = statistics.mean(r["accuracy"] for r in full) if full else None
    summary = []
    for arm, records in by_arm.items():
        if not records:
            continue
        accuracies = [100 * r["accuracy"] for r in records]
        mean = statistics.mean(accuracies)
        summary.append({
            "arm": arm,
            "seeds": [r["seed"] for r in records],
            "accuracy_mean": mean,
            "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else None,
            "vs_full": None if full_mean is None else mean - 100 * full_mean,
            "peak_rss_mb": statistics.mean(r["peak_rss_mb"] for r in records),
            "step_s": statistics.mean(r["train_runtime_s"] / r["train_steps"] for r in records),
        })  # fmt: skip
    return summary


def render(summary: list[dict]) -> str:
    """The summary as a Markdown table."""
    rows = []
    for row in summary:
        spread = "" if row["accuracy_std"] is None else f" ± {row['accuracy_std']:.2f}"
        versus = "—" if row["arm"] == "full" or row["vs_full"] is None else f"{row['vs_full']:+.2f}"
        seeds = ", ".join(str(s) for s in row["seeds"])
        rows.append([
            row["arm"], seeds, f"{row['accuracy_mean']:.2f}{spread}", versus, f"{row['peak_rss_mb']:.0f}",
            f"{row['step_s']:.2f}",
        ])  # fmt: skip
    header = ["arm", "seeds", "dev accuracy %", "vs full (points)", "peak RSS MB", "s / step"]
    return markdown_table(header, rows)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="pretrained encoder (a local folder or a Hub id)")
    parser.add_argument("--task", choices=list(TASK_FILES), default="sst2")
    parser.add_argument("--data", required=True, help="folder holding the task's train.tsv and dev.tsv")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[42])
    parser.add_argument("--max_train_samples", type=int, default=2000)
    parser.add_argument("--learning_rate", type=float, default=1e-4, help="of the arms that train every weight")
    parser.add_argument("--lora_learning_rate", type=float, default=1e-3, help="of the arms that train LoRA adapters")
    parser.add_argument("--out", default="runs/adjoint_arms")
    args = parser.parse_args(argv)
    if args.max_train_samples < 1:
        parser.error(f"--max_train_samples must be at least 1, got {args.max_train_samples}")
    return args


def finished_runs(task_dir: Path) -> list[dict]:
    """Every finished run's record under ``task_dir`` (arm/seed_S/record.json), in ARMS then seed order."""
    records = [json.loads(path.read_text()) for path in task_dir.glob("*/seed_*/record.json")]
    return sorted(records, key=lambda r: (list(ARMS).index(r["arm"]), r["seed"]))


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    task_dir = Path(args.out) / args.task
    task_dir.mkdir(parents=True, exist_ok=True)
    todo = [(arm, seed) for seed in args.seeds for arm in args.arms]
    for index, (arm, seed) in enumerate(todo, 1):
        if (task_dir / arm / f"seed_{seed}" / "record.json").exists():
            continue
        started = time.monotonic()
        print(f"[{index}/{len(todo)}] {args.task} {arm} seed {seed} ...", flush=True)
        record = run_one(args, arm, seed)
        print(f"    accuracy {100 * record['accuracy']:.2f} % in {time.monotonic() - started:.0f} s", flush=True)
        settings = {"model": args.model, "task": args.task, "max_train_samples": args.max_train_samples,
                    "learning_rate": args.learning_rate, "lora_learning_rate": args.lora_learning_rate,
                    "command": " ".join(sys.argv)}  # fmt: skip
        summary = write_grid_results(task_dir / "results.json", settings, finished_runs(task_dir), summarise)
        write_text_atomic(task_dir / "table.md", render(summary))
    summary = summarise(finished_runs(task_dir))
    print(render(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
