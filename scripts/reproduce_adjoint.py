"""Reproduce the adjoint experiment of Sander et al. (NeurIPS 2022): gradient error vs depth, Euler vs Heun.

    python scripts/reproduce_adjoint.py --depths 8 16 32 64 128 --out runs/adjoint

Writes OUT/results.json (resumable), OUT/table.md and OUT/adjoint_error.png, and prints the table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from adjoint_experiments import SETTINGS, run, table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[8, 16, 32, 64, 128], help="stack depths N")
    parser.add_argument("--out", type=Path, default=Path("runs/adjoint"), help="output folder")
    parser.add_argument(
        "--settings",
        nargs="+",
        choices=list(SETTINGS),
        default=list(SETTINGS),
        help="weight profiles: smooth (1/N), iid (1/N), iid-sqrt (1/sqrt(N))",
    )
    parser.add_argument("--gain", type=float, default=2.0, help="gain of each residual branch's weights")
    args = parser.parse_args(argv)
    if any(n < 2 for n in args.depths):
        parser.error(f"--depths must be integers ≥ 2, got {args.depths}")
    if not args.gain > 0:
        parser.error(f"--gain must be positive, got {args.gain}")
    points = run(sorted(set(args.depths)), args.out, args.gain, args.settings)
    print(table(points, sorted(set(args.depths))), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
