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
        description="Create REPO_ID on the Hugging Face Hub if needed and upload the files of RUN_DIR that a model "
        "repository holds: weights (*.safetensors, pytorch_model*.bin and their indexes), config.json, "
        "generation/preprocessor/processor configs, tokenizer files, README.md, results.json, "
        "sinkhorn_conversion.json and adapter/. Anything else (training state, logs, .env, keys, tokens) is left "
        "out unless named with --include; training state (checkpoints, optimizer/scheduler/RNG states, "
        "trainer_state.json, training_args.bin, tensorboard runs/) also with --include-checkpoints. A link that "
        "leads out of RUN_DIR is never sent. --dry-run lists what would be sent and what is left out, and why. "
        "Refuses without a README.md model card (write it with `sinkhorn-hf card`). The token comes from HF_TOKEN "
        "or `hf auth login`.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="directory holding the saved model and card")
    parser.add_argument("repo_id", metavar="REPO_ID", help="Hub model repository, e.g. user/bert-sinkhorn-sst2")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--dry-run", action="store_true", help="list the files that would be uploaded; send nothing")
    parser.add_argument(
        "--include-checkpoints", action="store_true", help="also upload checkpoints, optimizer states and logs"
    )
    parser.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="PATTERN",
        help="also upload the paths matching PATTERN (relative to RUN_DIR, e.g. 'eval/*'; repeatable); a link "
        "out of RUN_DIR is still left out",
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
            include=args.include,
            dry_run=args.dry_run,
        )
    except PushError as error:
        fail(error)
    sizes = {name: (args.run_dir / name).stat().st_size for name in report.files}
    verb = "would upload" if args.dry_run else "uploaded"
    print(f"{verb} {len(report.files)} files ({_size(sum(sizes.values()))}) to {args.repo_id}:")
    for name in report.files:
        print(f"  {name}  ({_size(sizes[name])})")
    for item in _grouped(report.left_out):
        print(f"left out: {item}")
    if placeholder:
        print(f"README.md: {'would fill' if args.dry_run else 'filled'} in the repository id {args.repo_id}")
    if not args.dry_run:
        print(f"commit: {report.commit_url}")
    return 0


def _grouped(left_out: list) -> list[str]:
    """One line per left-out path, a folder whose files all share one reason (a checkpoint, .git) as one line."""
    by_folder: dict[str, list] = {}
    for item in left_out:
        by_folder.setdefault(item.path.split("/")[0] if "/" in item.path else item.path, []).append(item)
    lines = []
    for top, items in by_folder.items():
        reasons = {item.reason for item in items}
        if len(items) > 1 and len(reasons) == 1:
            lines.append(f"{top}/ ({len(items)} files: {reasons.pop()})")
        else:
            lines.extend(str(item) for item in items)
    return lines


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.1f} MB" if n_bytes >= 1e6 else f"{n_bytes / 1e3:.1f} kB"
