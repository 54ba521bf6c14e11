"""``sinkhorn-hf push``: upload a saved model with its card to the Hugging Face Hub."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import add_command, fail


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers,
        "push",
        run,
        help="upload RUN_DIR (model, tokenizer, results, card) to a Hub model repository",
        description="Create REPO_ID on the Hugging Face Hub if needed and upload RUN_DIR, leaving out training "
        "state (accelerate checkpoints/ and checkpoint-*/ folders, optimizer/scheduler/sampler/scaler files, "
        "random_states*, tensorboard runs/) unless --include-checkpoints. Refuses without a README.md model card "
        "(write it with `sinkhorn-hf card`). The token comes from HF_TOKEN or `hf auth login`.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="directory holding the saved model and card")
    parser.add_argument("repo_id", metavar="REPO_ID", help="Hub model repository, e.g. user/bert-sinkhorn-sst2")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--dry-run", action="store_true", help="list the files that would be uploaded; send nothing")
    parser.add_argument(
        "--include-checkpoints", action="store_true", help="also upload checkpoints, optimizer states and logs"
    )


def run(args: argparse.Namespace) -> int:
    from ..hub.push import PushError, card_has_placeholder, push

    try:
        placeholder = card_has_placeholder(args.run_dir)
        report = push(
            args.run_dir,
            args.repo_id,
            private=args.private,
            include_checkpoints=args.include_checkpoints,
            dry_run=args.dry_run,
        )
    except PushError as error:
        fail("push", error)
    sizes = {name: (args.run_dir / name).stat().st_size for name in report.files}
    verb = "would upload" if args.dry_run else "uploaded"
    print(f"{verb} {len(report.files)} files ({_size(sum(sizes.values()))}) to {args.repo_id}:")
    for name in report.files:
        print(f"  {name}  ({_size(sizes[name])})")
    if placeholder:
        print(f"README.md: {'would fill' if args.dry_run else 'filled'} in the repository id {args.repo_id}")
    if not args.dry_run:
        print(f"commit: {report.commit_url}")
    return 0


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.1f} MB" if n_bytes >= 1e6 else f"{n_bytes / 1e3:.1f} kB"
