"""Peak activation memory and step time of one training step of a BERT-shaped encoder, by depth and scheme.

    python scripts/bench_memory.py --depths 6 12 24 48 --seq-len 256 --batch-size 8 --hidden 768 --heads 12

Configurations: ``plain`` backprop, ``gc`` (transformers' gradient checkpointing), and the adjoint schemes
(``euler``, ``heun``, ``auto``; ``checkpoint`` and ``momentum`` on request). Each (depth, configuration) runs in
its own process: after a warm-up step (which allocates gradients and AdamW state, and lets ``auto`` probe),
the peak resident memory of the next steps is read from the kernel (VmHWM after resetting it through
/proc/self/clear_refs, with glibc returning freed tensors to the system at once) minus the resident memory
just before them, so parameters, gradients and optimizer state are excluded. On CUDA the same is done with
torch.cuda.max_memory_allocated. Step time is the median of the measured steps. Ratios are against plain
backprop at the same depth, measured in the same run. Results go to OUT/results.json (a killed run resumes).

    python scripts/bench_memory.py --dynamic-padding --model ../shared/models/all-MiniLM-L6-v2 --steps 120

``--dynamic-padding``: resident memory over a training run of a pretrained encoder whose batches have another
padded length every step (``--min-len``..``--max-len``, as DataCollatorWithPadding gives), per attention
(``sdpa`` and ``sinkhorn`` with ``--iterations``), each in its own process with glibc's default allocator
settings (what a user's run sees): VmRSS every ``--every`` steps, the growth from ``--flat-from`` to the last
step, and the ratio to SDPA at the same step. Results go to OUT/dynamic_padding.json and OUT/dynamic_padding.md.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from experiment_files import run_depth_grid, run_memory_worker

CONFIGS = ("plain", "gc", "euler", "heun", "auto", "checkpoint", "momentum")
DEFAULT_CONFIGS = ("plain", "gc", "euler", "heun", "auto")
_MIB = 2**20


def _rss_bytes(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", status).group(1)) * 1024


def worker(args: argparse.Namespace) -> dict:
    """One configuration at one depth, in this process."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    import sinkhorn_hf
    from sinkhorn_hf.compat import model_from_config

    torch.manual_seed(0)
    device = torch.device(args.device)
    config = BertConfig(
        vocab_size=1000,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.depth,
        max_position_embeddings=max(512, args.seq_len),
        num_labels=2,
    )
    model = model_from_config(BertForSequenceClassification, config, attn_implementation="sdpa").to(device).train()
    if args.config == "gc":
        model.gradient_checkpointing_enable()
    elif args.config != "plain":
        sinkhorn_hf.enable_adjoint(model, scheme=args.config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, 1000, (args.batch_size, args.seq_len), device=device)
    labels = torch.randint(0, 2, (args.batch_size,), device=device)

    def step() -> None:
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated: part of the baseline

    step()  # warm-up: allocates gradients and AdamW state; auto probes here
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
        base = _rss_bytes("VmRSS")
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else _rss_bytes("VmHWM")
    return {"depth": args.depth, "config": args.config, "peak_bytes": peak - base, "step_s": statistics.median(times)}


def padding_worker(args: argparse.Namespace) -> dict:
    """Train ``args.model`` with ``args.attention`` on random batches of random padded lengths; VmRSS every
    ``args.every`` steps."""
    import torch
    from transformers import AutoModelForSequenceClassification

    import sinkhorn_hf  # noqa: F401  (registers attn_implementation="sinkhorn")

    torch.manual_seed(0)
    extra = {"sinkhorn_iterations": args.iterations} if args.attention == "sinkhorn" else {}
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=2, attn_implementation=args.attention, **extra
    ).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
    generator = torch.Generator().manual_seed(1)  # the same batches for every attention
    vocab, rss = model.config.vocab_size, {}
    for step in range(1, args.steps + 1):
        padded = int(torch.randint(args.min_len, args.max_len + 1, (), generator=generator))
        lengths = torch.randint(args.min_len, padded + 1, (args.batch_size,), generator=generator)
        lengths[0] = padded  # the collator pads to the longest sequence of the batch
        mask = (torch.arange(padded)[None] < lengths[:, None]).long()
        ids = torch.randint(1000, vocab, (args.batch_size, padded), generator=generator) * mask
        labels = torch.randint(0, 2, (args.batch_size,), generator=generator)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % args.every == 0:
            rss[step] = _rss_bytes("VmRSS") / _MIB
    return {"attention": args.attention, "rss_mib": rss}


def padding_table(results: dict[str, dict], flat_from: int) -> str:
    """Markdown: VmRSS per step and attention, the ratio to SDPA, and the growth from ``flat_from`` to the end."""
    names = list(results)
    steps = sorted({int(step) for r in results.values() for step in r["rss_mib"]})
    lines = [
        "| step | "
        + " | ".join(f"{name} MiB" for name in names)
        + " | "
        + " | ".join(f"{name} ×sdpa" for name in names if name != "sdpa")
        + " |"
    ]
    lines.append("|---|" + "---|" * (2 * len(names) - ("sdpa" in names)))
    for step in steps:
        rss = {name: results[name]["rss_mib"].get(str(step), results[name]["rss_mib"].get(step)) for name in names}
        ratios = [f"{rss[n] / rss['sdpa']:.2f}" for n in names if n != "sdpa" and "sdpa" in rss]
        lines.append(f"| {step} | " + " | ".join(f"{rss[n]:.0f}" for n in names) + " | " + " | ".join(ratios) + " |")
    growth = []
    for name in names:
        series = {int(k): v for k, v in results[name]["rss_mib"].items()}
        if flat_from in series:
            last = max(series)
            change = 100 * (series[last] / series[flat_from] - 1)
            growth.append(f"{name}: {change:+.1f} % from step {flat_from} to {last}")
    return "\n".join(lines) + "\n\nGrowth: " + "; ".join(growth) + "\n"


def run_padding(args: argparse.Namespace) -> int:
    from sinkhorn_hf.atomic_files import write_text_atomic

    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for attention in ("sdpa", "sinkhorn"):
        command = [sys.executable, __file__, "--dynamic-padding", "--worker", "--attention", attention]
        for name in ("model", "steps", "every", "batch_size", "min_len", "max_len", "iterations"):
            command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{attention} failed:\n{done.stderr[-3000:]}")
        results[attention] = json.loads(done.stdout.strip().splitlines()[-1])
    shape = {k: getattr(args, k) for k in ("model", "steps", "batch_size", "min_len", "max_len", "iterations")}
    write_text_atomic(args.out / "dynamic_padding.json", json.dumps({"shape": shape, "results": results}, indent=1))
    text = padding_table(results, args.flat_from)
    write_text_atomic(args.out / "dynamic_padding.md", text)
    print(f"shape: {shape}\n{text}", end="")
    return 0


def run_one(args: argparse.Namespace, depth: int, config: str) -> dict:
    command = [sys.executable, __file__, "--worker", "--depth", str(depth), "--config", config]
    for name in ("seq_len", "batch_size", "hidden", "heads", "steps", "device"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return run_memory_worker(command, f"{config} at depth {depth}")


def _ratio(value: float, baseline: float) -> str:
    # At toy sizes the peak-RSS counter can read 0 for the baseline: print no ratio rather than divide by it.
    return f"{value / baseline:.2f}" if baseline > 0 else "n/a"


def table(results: list[dict], depths: list[int], configs: list[str]) -> str:
    """Markdown: per depth and configuration, peak activation MiB (× plain) and step time s (× plain)."""
    by = {(r["depth"], r["config"]): r for r in results}
    head = "| L | " + " | ".join(f"{c} MiB (×plain) | {c} s (×plain)" for c in configs) + " |"
    lines = [head, "|---|" + "---|---|" * len(configs)]
    for depth in depths:
        plain = by.get((depth, "plain"))
        cells = []
        for c in configs:
            r = by[(depth, c)]
            mem, sec = r["peak_bytes"] / _MIB, r["step_s"]
            if plain:
                cells += [
                    f"{mem:.0f} ({_ratio(r['peak_bytes'], plain['peak_bytes'])})",
                    f"{sec:.2f} ({_ratio(sec, plain['step_s'])})",
                ]
            else:
                cells += [f"{mem:.0f}", f"{sec:.2f}"]
        lines.append(f"| {depth} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[6, 12, 24, 48])
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), choices=CONFIGS)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--steps", type=int, default=2, help="measured steps after the warm-up step")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_memory"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    padding = parser.add_argument_group("--dynamic-padding: a pretrained model's training run, lengths varying")
    padding.add_argument("--dynamic-padding", action="store_true", help="measure VmRSS over a training run")
    padding.add_argument("--model", default="../shared/models/all-MiniLM-L6-v2", help="pretrained encoder")
    padding.add_argument("--iterations", type=int, default=3, help="Sinkhorn iterations K")
    padding.add_argument("--min-len", type=int, default=16)
    padding.add_argument("--max-len", type=int, default=128)
    padding.add_argument("--every", type=int, default=20, help="read VmRSS every this many steps")
    padding.add_argument("--flat-from", type=int, default=40, help="report growth from this step to the last")
    padding.add_argument("--attention", choices=("sdpa", "sinkhorn"), help=argparse.SUPPRESS)
    parser.add_argument("--depth", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--config", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("seq_len", "batch_size", "hidden", "heads", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be ≥ 1")
    if any(d < 1 for d in args.depths):
        parser.error(f"--depths must be ≥ 1, got {args.depths}")
    if not 1 <= args.min_len <= args.max_len:
        parser.error(f"--min-len and --max-len must satisfy 1 <= min <= max, got {args.min_len}, {args.max_len}")
    if args.hidden % args.heads:
        parser.error(f"--hidden ({args.hidden}) must be a multiple of --heads ({args.heads})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.dynamic_padding and args.worker:
        print(json.dumps(padding_worker(args)))
        return 0
    if args.dynamic_padding:
        return run_padding(args)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    from sinkhorn_hf.atomic_files import write_text_atomic

    shape = {k: getattr(args, k) for k in ("seq_len", "batch_size", "hidden", "heads", "steps", "device")}
    results = run_depth_grid(
        args.out, shape, args.depths, args.configs, lambda d, c: run_one(args, d, c), desc="bench_memory"
    )
    text = table(results, args.depths, args.configs)
    write_text_atomic(args.out / "table.md", text)
    print(f"shape: {shape}\n{text}", end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
