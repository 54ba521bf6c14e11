"""Compile every Triton kernel of sinkhorn_hf for a CUDA architecture on a machine without a GPU.

Runs Sinkhorn attention forward and backward through the Triton route on CPU tensors, but instead of launching
each kernel it compiles it (Triton front end, LLVM, ptxas) for the target, with the constexprs and argument
types of the real launch, and reports the shared memory it needs against the architecture's limit per block. The
kernels' outputs are never computed (the tensors stay uninitialised): this checks that the kernels build and fit,
not what they compute (the interpreter tests do that).

    python scripts/compile_triton_kernels.py                     # sm_90 (H100/H200), D ∈ {64, 128}, all dtypes
    python scripts/compile_triton_kernels.py --arch 80 --dims 64 --output kernels.json

Exits 1 if a kernel fails to compile or needs more shared memory than one block may have.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if os.environ.get("TRITON_INTERPRET"):  # the kernels are decorated at import: they must be compiled, not interpreted
    raise SystemExit("compile_triton_kernels.py: unset TRITON_INTERPRET (it compiles the kernels; it runs none)")

import torch
import triton
import triton.runtime.jit as triton_jit
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# shared memory one thread block may opt in to, in bytes (CUDA programming guide, compute capabilities table)
MAX_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TYPE_NAMES = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.uint8: "u8", torch.int8: "i8",
    torch.bool: "i1", torch.int32: "i32", torch.int64: "i64",
}  # fmt: skip


def type_of(value: object) -> object:
    """Triton's signature entry for a launch argument: a pointer type for a tensor, a scalar type, or a tuple."""
    if isinstance(value, torch.Tensor):
        return "*" + _TYPE_NAMES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    if isinstance(value, tuple):
        return tuple(type_of(item) for item in value)
    raise TypeError(f"cannot type a launch argument of type {type(value).__name__}")


class Compiler:
    """Stands in for ``JITFunction.run``: compiles each distinct launch once for ``arch``, checks it against the
    architecture's shared memory per block, records it and prints one line (the builds take seconds each)."""

    def __init__(self, arch: int) -> None:
        self.arch, self.limit, self.records, self._seen = arch, MAX_SHARED[arch], [], set()

    def run(self, function: triton_jit.JITFunction, args: tuple, kwargs: dict, case: str) -> None:
        names = [param.name for param in function.params]
        bound = dict(zip(names, args, strict=False)) | kwargs  # trailing defaults may be left out
        constexprs = {param.name: bound[param.name] for param in function.params if param.is_constexpr}
        signature = {
            param.name: "constexpr" if param.is_constexpr else type_of(bound[param.name]) for param in function.params
        }
        key = (function.__name__, repr(sorted(constexprs.items())), repr(signature))
        if key in self._seen:
            return
        self._seen.add(key)
        record = {"kernel": function.__name__, "case": case, "constexprs": constexprs}
        try:
            compiled = triton.compile(
                ASTSource(function, signature, constexprs), target=GPUTarget("cuda", self.arch, 32)
            )
        except Exception as error:  # noqa: BLE001  (reported per kernel; the exit status says it failed)
            record["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        else:
            metadata = compiled.metadata
            record |= {
                "shared_bytes": metadata.shared,
                "num_warps": metadata.num_warps,
                "num_stages": metadata.num_stages,
            }
            if metadata.shared > self.limit:
                record["error"] = f"needs {metadata.shared} B of shared memory, over sm_{self.arch}'s {self.limit} B"
        self.records.append(record)
        status = record.get("error") or f"ok: {record['shared_bytes']} B shared memory"
        print(f"sm_{self.arch} {record['kernel']:<20} {case:<22} {status}", flush=True)


def run_case(compiler: Compiler, dim: int, dtype: torch.dtype, iterations: int, tiles: dict[str, int]) -> None:
    """One forward+backward with padding and a differentiable bias: every kernel of the route is launched."""
    from sinkhorn_hf.attention.triton import api

    case = f"D={dim} {str(dtype).removeprefix('torch.')} K={iterations}"
    original, interpreting = triton_jit.JITFunction.run, api._interpreting

    def compile_instead(function, *args, grid, warmup, **kwargs):
        compiler.run(function, args, kwargs, case)

    triton_jit.JITFunction.run = compile_instead
    api._interpreting = lambda: True  # accept CPU tensors: nothing is launched
    try:
        shape = (1, 2, 128, dim)
        query, key, value = (torch.zeros(shape, dtype=dtype, requires_grad=True) for _ in range(3))
        bias = torch.zeros(1, 1, 128, 128, requires_grad=True)
        valid = torch.ones(1, 1, 128, 1, dtype=torch.bool)
        output = api.triton_sinkhorn_attention(
            query,
            key,
            value,
            iterations=iterations,
            bias=bias,
            query_valid=valid,
            allowed=valid.transpose(-1, -2),
            **tiles,
        )
        output.sum().backward()
    finally:
        triton_jit.JITFunction.run, api._interpreting = original, interpreting


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(MAX_SHARED), help="compute capability ×10")
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128], help="head dims D")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--iterations", type=int, nargs="+", default=[3, 4], help="K (odd and even differ)")
    parser.add_argument("--tiles", type=int, nargs=2, metavar=("BLOCK_M", "BLOCK_N"), help="instead of the defaults")
    parser.add_argument("--output", type=Path, help="also write the records as JSON")
    args = parser.parse_args(argv)
    compiler = Compiler(args.arch)
    for dim in args.dims:
        for dtype in args.dtypes:
            for iterations in args.iterations:
                tiles = {} if args.tiles is None else dict(zip(("block_m", "block_n"), args.tiles, strict=True))
                run_case(compiler, dim, DTYPES[dtype], iterations, tiles)
    failed = sum("error" in record for record in compiler.records)
    if args.output is not None:
        from sinkhorn_hf.atomic_files import write_json_atomic

        report = {"arch": args.arch, "max_shared_bytes": compiler.limit, "kernels": compiler.records}
        write_json_atomic(args.output, report)
    print(f"{len(compiler.records)} kernel builds, {failed} failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
