"""``sinkhorn-hf convert``: a pretrained checkpoint → the same weights with Sinkhorn attention in config.json."""

from __future__ import annotations

import argparse
import shlex

from ..attention.settings import DEFAULT_ITERATIONS
from . import add_command, fail


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers,
        "convert",
        run,
        help="convert a pretrained encoder to Sinkhorn attention (weights unchanged)",
        description="Write a copy of SRC whose config.json selects Sinkhorn attention with the given settings. "
        "Weights, tokenizer and processor files are copied byte for byte; with --iterations 1 the converted model "
        "computes exactly what SRC computes. Load it with `import sinkhorn_hf` and from_pretrained(OUT).",
    )
    parser.add_argument("source", metavar="SRC", help="local checkpoint directory or Hub model id")
    parser.add_argument("output_dir", metavar="OUT", help="directory to write (must be empty unless --overwrite)")
    parser.add_argument(
        "--iterations",
        type=int,
        default=DEFAULT_ITERATIONS,
        metavar="K",
        help=f"Sinkhorn iterations K, rows first (1 = SoftMax; default {DEFAULT_ITERATIONS})",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="stop early once column sums are within this of their target (default: always run K iterations)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT when it holds an earlier conversion (sinkhorn_conversion.json)",
    )


def run(args: argparse.Namespace) -> int:
    from ..families import UnsupportedModelError
    from ..hub.convert import ConversionError, convert

    command = ["sinkhorn-hf", "convert", args.source, args.output_dir, "--iterations", str(args.iterations)]
    if args.tolerance is not None:
        command += ["--tolerance", str(args.tolerance)]
    if args.overwrite:
        command.append("--overwrite")
    try:
        report = convert(
            args.source,
            args.output_dir,
            iterations=args.iterations,
            tolerance=args.tolerance,
            overwrite=args.overwrite,
            command=shlex.join(command),
        )
    except (ConversionError, UnsupportedModelError) as error:
        fail(error)
    where = f" (Hub commit {report.revision})" if report.revision else ""
    print(f"converted {report.source}{where} -> {report.output_dir}")
    print(f"attention: sinkhorn, iterations={report.settings.iterations}, tolerance={report.settings.tolerance}")
    print(f"written: {', '.join(report.copied)}")
    if report.not_copied:
        print(f"not copied (not needed to load the model with transformers): {', '.join(report.not_copied)}")
    print(f"next: sinkhorn-hf card {shlex.quote(str(report.output_dir))}")
    return 0
