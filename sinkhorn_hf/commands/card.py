"""``sinkhorn-hf card``: write or refresh the model card (README.md) of a saved Sinkhorn model."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from . import add_command, fail


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers,
        "card",
        run,
        help="write RUN_DIR/README.md, the Hub model card of a converted or fine-tuned model",
        description="Render RUN_DIR/README.md from the model card template: base model, tags, datasets, Sinkhorn "
        "and adjoint settings, the training command, evaluation results as Hub model-index metadata, a loading "
        "snippet and citations. Uses RUN_DIR/results.json when present (a fine-tuned run); without it, the card "
        "describes a converted checkpoint. An existing README.md is replaced.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="directory holding the saved model")
    parser.add_argument(
        "--results", type=Path, help="trainer results file (default: RUN_DIR/results.json when it exists)"
    )
    parser.add_argument("--base-model", help="Hub id of the base model, when the run started from a local copy of it")
    parser.add_argument("--repo-id", help="Hub repository the card's loading snippet names (push fills it in)")
    parser.add_argument("--license", help="license id for the metadata, e.g. apache-2.0 (the base model's)")
    parser.add_argument("--template", type=Path, help="a Jinja card template to use instead of the built-in one")


def run(args: argparse.Namespace) -> int:
    from ..hub.card import CardError, write_card

    if not args.run_dir.is_dir():
        fail(f"RUN_DIR {args.run_dir}: this folder does not exist", usage=True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            path = write_card(
                args.run_dir,
                args.results,
                base_model=args.base_model,
                repo_id=args.repo_id,
                license=args.license,
                template_path=args.template,
            )
    except CardError as error:
        fail(error)
    for warning in caught:
        print(f"sinkhorn-hf card: warning: {warning.message}", file=sys.stderr)
    print(f"wrote {path}")
    return 0
