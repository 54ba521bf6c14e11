"""``sinkhorn-hf export``: a Sinkhorn checkpoint → an ONNX file, checked in ONNX Runtime against PyTorch."""

from __future__ import annotations

import argparse

from ..hub.export import DEFAULT_TOLERANCE
from ..user_errors import check_checkpoint_dir
from . import add_command, fail


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers,
        "export",
        run,
        help="export a Sinkhorn checkpoint to ONNX (checked in ONNX Runtime)",
        description="Load MODEL with Sinkhorn attention and the sinkhorn_* settings of its config, export it with "
        "torch.onnx.export (dynamo) with dynamic batch and sequence axes, run it in ONNX Runtime on a padded sample "
        "batch and write OUT only if it matches PyTorch within --tolerance. Needs the onnx, onnxscript and "
        "onnxruntime packages.",
    )
    parser.add_argument("model", metavar="MODEL", help="local checkpoint directory or Hub model id")
    parser.add_argument("output", metavar="OUT.onnx", help="ONNX file to write (must not exist unless --overwrite)")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help=f"largest |ONNX Runtime - PyTorch| accepted (default {DEFAULT_TOLERANCE:g})",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT.onnx")


def run(args: argparse.Namespace) -> int:
    from ..families import UnsupportedModelError
    from ..hub.export import ExportError, export_onnx

    check_checkpoint_dir(args.model, "MODEL")
    try:
        report = export_onnx(args.model, args.output, overwrite=args.overwrite, tolerance=args.tolerance)
    except (ExportError, UnsupportedModelError) as error:
        fail(error)
    except ImportError as error:
        fail(f"{error} (pip install onnx onnxscript onnxruntime)")
    settings = report.settings
    print(f"exported {report.source} -> {report.output}")
    print(f"attention: sinkhorn, iterations={settings.iterations}, tolerance={settings.tolerance}")
    axes = ", ".join(f"{name} ({', '.join(dims)})" for name, dims in report.dynamic_axes.items())
    print(f"inputs: {axes}; outputs: {', '.join(report.outputs)}")
    print(f"ONNX Runtime vs PyTorch: max abs difference {report.max_abs_diff:.3g}")
    return 0
