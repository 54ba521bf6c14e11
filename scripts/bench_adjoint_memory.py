"""Peak memory of the *first* training steps under the adjoint, self-checks included, by depth and scheme.

    python scripts/bench_adjoint_memory.py --depths 6 24 --seq-len 512 --batch-size 16 --hidden 256 --heads 4

Unlike ``scripts/bench_memory.py`` (steady state after a warm-up step), this one measures what a run needs to
survive its first steps: the first backward of a rebuilding scheme is its checked pass (the guard keeps exact
inputs of ``reference_rows`` sequences per layer) and ``auto`` probes then. Each (depth, configuration) runs in
its own process: the model is built, then the kernel's peak resident counter is reset (VmHWM through
/proc/self/clear_refs, glibc returning freed tensors at once) and ``--steps`` SGD steps run (no optimizer state);
the peak minus the resident memory before the first step is reported, so parameters are excluded and gradients
included (``--after-first-step``: one step runs before the counter is reset, so gradients are excluded and the
checked pass is over: activation memory only). The figure of merit is the growth of that peak from the smallest to
the largest depth, against checkpointing's growth measured in the same run.

Configurations: ``plain``, ``checkpoint``, ``euler`` / ``heun`` (with ``allow_inexact``: a random or pretrained
encoder is not rebuilt within tolerance; the guard still keeps its references), ``momentum`` (exactly invertible:
the guard passes without ``allow_inexact``), ``reversible`` (its default coupling), ``auto``, and
``euler-whole-batch`` (the guard's references on the whole batch, ``reference_rows=None``: the behaviour before the
checks ran on a slice).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench_memory import _rss_bytes  # the kernel's resident-memory counters, read as bench_memory does
from experiment_files import run_depth_grid, run_memory_worker

# name -> (scheme, enable_adjoint keyword arguments); "plain" enables nothing
CONFIGS: dict[str, tuple[str, dict]] = {
    "plain": ("off", {}),
    "checkpoint": ("checkpoint", {}),
    "euler": ("euler", {"allow_inexact": True}),
    "heun": ("heun", {"allow_inexact": True}),
    "momentum": ("momentum", {}),
    "auto": ("auto", {}),
    "euler-whole-batch": ("euler", {"allow_inexact": True, "reference_rows": None}),
    "reversible": ("reversible", {}),
}
DEFAULT_CONFIGS = ("plain", "checkpoint", "euler", "momentum", "auto", "euler-whole-batch")
_MIB = 2**20


def worker(args: argparse.Namespace) -> dict:
    """One configuration at one depth, in this process."""
    import warnings

    import torch
    from transformers import BertConfig, BertForSequenceClassification

    import sinkhorn_hf
    from sinkhorn_hf.adjoint import describe_adjoint
    from sinkhorn_hf.compat import model_from_config

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=1000,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.depth,
        max_position_embeddings=max(512, args.seq_len),
        num_labels=2,
    )
    model = model_from_config(BertForSequenceClassification, config, attn_implementation="sdpa").train()
    scheme, options = CONFIGS[args.config]
    if scheme != "off":
        sinkhorn_hf.enable_adjoint(model, scheme=scheme, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-5)  # no state: the growth is gradients + activations
    ids = torch.randint(0, 1000, (args.batch_size, args.seq_len))
    labels = torch.randint(0, 2, (args.batch_size,))
    if args.after_first_step:  # activation memory only: gradients allocated, the first (checked) pass done
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.zero_grad(set_to_none=False)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
    base = _rss_bytes("VmRSS")
    times = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(args.steps):
            start = time.perf_counter()
            model(input_ids=ids, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
            times.append(time.perf_counter() - start)
    peak = _rss_bytes("VmHWM")
    return {
        "depth": args.depth,
        "config": args.config,
        "peak_bytes": peak - base,
        "step_s": times,
        "adjoint": describe_adjoint(model),
        "warnings": sorted({str(w.message)[:200] for w in caught}),
    }


def run_one(args: argparse.Namespace, depth: int, config: str) -> dict:
    command = [sys.executable, __file__, "--worker", "--depth", str(depth), "--config", config]
    for name in ("seq_len", "batch_size", "hidden", "heads", "steps"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    command += ["--after-first-step"] if args.after_first_step else []
    return run_memory_worker(command, f"{config} at depth {depth}")


def table(results: list[dict], depths: list[int], configs: list[str]) -> str:
    """Markdown: per configuration, peak MiB at each depth, growth from the first to the last depth, and that
    growth as a fraction of checkpointing's (when checkpoint was measured)."""
    by = {(r["depth"], r["config"]): r for r in results}
    low, high = depths[0], depths[-1]

    def growth(config: str) -> float | None:
        if (low, config) in by and (high, config) in by:
            return (by[high, config]["peak_bytes"] - by[low, config]["peak_bytes"]) / _MIB
        return None

    reference = growth("checkpoint")
    head = "| config | " + " | ".join(f"L={d} MiB" for d in depths) + f" | growth {low}→{high} MiB | × checkpoint's |"
    lines = [head, "|---|" + "---|" * (len(depths) + 2)]
    for config in configs:
        cells = [f"{by[d, config]['peak_bytes'] / _MIB:.0f}" if (d, config) in by else "–" for d in depths]
        g = growth(config)
        ratio = f"{g / reference:.2f}" if g is not None and reference else "–"
        lines.append(f"| {config} | " + " | ".join(cells) + f" | {'–' if g is None else f'{g:.0f}'} | {ratio} |")
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[6, 24])
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1, help="steps measured from the first (1: the checked pass)")
    parser.add_argument(
        "--after-first-step",
        action="store_true",
        help="measure from the second step (gradients excluded, no checked pass): activation memory only",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench_adjoint_memory"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--depth", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--config", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("seq_len", "batch_size", "hidden", "heads", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be ≥ 1")
    if any(d < 1 for d in args.depths) or sorted(args.depths) != args.depths:
        parser.error(f"--depths must be increasing integers ≥ 1, got {args.depths}")
    if args.hidden % args.heads:
        parser.error(f"--hidden ({args.hidden}) must be a multiple of --heads ({args.heads})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    from sinkhorn_hf.atomic_files import write_text_atomic

    shape = {k: getattr(args, k) for k in ("seq_len", "batch_size", "hidden", "heads", "steps", "after_first_step")}
    results = run_depth_grid(
        args.out, shape, args.depths, args.configs, lambda d, c: run_one(args, d, c), desc="bench_adjoint_memory"
    )
    text = table(results, args.depths, args.configs)
    write_text_atomic(args.out / "table.md", text)
    print(f"shape: {shape}\n{text}", end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
