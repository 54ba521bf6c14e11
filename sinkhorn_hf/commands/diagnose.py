"""``sinkhorn-hf diagnose``: how far a model's own SoftMax attention is from doubly stochastic."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..user_errors import check_checkpoint_dir
from . import add_command, fail

# The sentences diagnosed when no --text-file is given (README quotes their numbers for MiniLM-L6).
BUILT_IN_SENTENCES = (
    "Sinkhorn attention makes every attention matrix doubly stochastic.",
    "Padding carries no mass.",
    "Rows and columns both sum to one over the valid tokens of each sentence in the batch.",
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers,
        "diagnose",
        run,
        help="measure how far a text encoder's softmax attention is from doubly stochastic",
        description="Run sentences through a model with SoftMax attention and report, per layer, the spread of "
        "column sums over valid tokens (0 = doubly stochastic). Optionally plot it.",
    )
    parser.add_argument("model", help="local path or Hub name of a supported text encoder")
    parser.add_argument("--text-file", type=Path, help="one sentence per line (default: a few built-in sentences)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--plot", type=Path, help="write a PNG of the column-sum spread per layer here")
    parser.add_argument("--json", type=Path, help="write the per-layer report as JSON here")


def run(args: argparse.Namespace) -> int:
    check_checkpoint_dir(args.model, "MODEL")
    if args.max_length < 1:
        fail(f"--max-length must be >= 1, got {args.max_length}", usage=True)
    if args.text_file is not None:
        if not args.text_file.is_file():
            fail(f"--text-file {args.text_file} does not exist", usage=True)
        sentences = [line.strip() for line in args.text_file.read_text().splitlines() if line.strip()]
        if not sentences:
            fail(f"--text-file {args.text_file} has no non-empty line", usage=True)
    else:
        sentences = list(BUILT_IN_SENTENCES)

    from transformers import AutoModel, AutoTokenizer

    from ..attention.diagnostics import plot_column_spread, softmax_marginals

    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModel.from_pretrained(args.model).eval()
    except OSError as error:  # transformers' word for a model it cannot find or read (a Hub id offline, ...)
        fail(f"cannot load {args.model}: {error}")
    inputs = tokenizer(sentences, padding=True, truncation=True, max_length=args.max_length, return_tensors="pt")
    report = softmax_marginals(model, **inputs)
    print("layer  std(col sums)  max|col sum-1|")
    for row in report.summary():
        print(f"{row['layer']:>5}  {row['column_std']:>13.3e}  {row['column_error']:>14.3e}")
    if args.json:
        args.json.write_text(json.dumps(report.summary(), indent=2))
    if args.plot:
        title = f"{model_label(args.model)}: SoftMax column-sum spread ({len(sentences)} sentences)"
        print(f"plot: {plot_column_spread(report, args.plot, title=title)}")
    return 0


def model_label(model: str) -> str:
    """A short name for a plot title: a local checkpoint's folder name, or the Hub id without its owner."""
    return Path(model.rstrip("/")).name or model
