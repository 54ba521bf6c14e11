"""The Triton kernels build for a real GPU on this GPU-less machine: scripts/compile_triton_kernels.py compiles every
kernel launch of a forward+backward (Triton front end, LLVM, ptxas) for sm_90 and checks its shared memory against
what one block may have. The interpreter tests check what the kernels compute; this checks that they compile."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KERNEL_SOURCES = sorted((ROOT / "sinkhorn_hf" / "attention" / "triton").glob("*.py"))


def compile_kernels(tmp_path: Path, *flags: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    output = tmp_path / "kernels.json"
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile, do not reuse an earlier build
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "compile_triton_kernels.py"), *flags, "--output", str(output)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200,
    )  # fmt: skip
    return result, json.loads(output.read_text()) if output.exists() else None


def launched_kernels() -> set[str]:
    """Every @triton.jit function of the package that is launched with a grid (the others are inlined helpers)."""
    text = "\n".join(path.read_text() for path in KERNEL_SOURCES)
    return set(re.findall(r"\b(\w+_kernel)\[", text))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arch", "dtypes", "max_shared"), [("90", ["bfloat16"], 232448), ("86", ["float32", "bfloat16"], 101376)]
)
def test_every_kernel_compiles_and_fits_the_shared_memory_of_a_block(tmp_path, arch, dtypes, max_shared):
    # the largest rows: head dim 128 in float32, even K with padding and a bias gradient (every kernel variant)
    flags = ["--arch", arch, "--dims", "128", "--iterations", "4", "--dtypes", *dtypes]
    result, report = compile_kernels(tmp_path, *flags)
    assert result.returncode == 0, result.stdout + result.stderr
    assert {record["kernel"] for record in report["kernels"]} == launched_kernels()
    for record in report["kernels"]:
        assert "error" not in record, record
        assert 0 < record["shared_bytes"] <= report["max_shared_bytes"] == max_shared, record


@pytest.mark.slow
def test_tiles_too_large_for_the_architecture_are_reported(tmp_path):
    # K=1 launches the fewest kernels; 64 × 64 float32 tiles at D=128 do not fit an A100 block
    result, report = compile_kernels(tmp_path, "--arch", "80", "--dims", "128", "--iterations", "1",
                                     "--dtypes", "float32", "--tiles", "64", "64")  # fmt: skip
    assert result.returncode == 1
    assert "output_kernel" in result.stdout and "over sm_80's 166912 B" in result.stdout
    assert any(record["shared_bytes"] > 166912 for record in report["kernels"])


def test_interpreter_mode_is_refused_with_the_reason(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "compile_triton_kernels.py")],
        capture_output=True, text=True, env=os.environ | {"TRITON_INTERPRET": "1"}, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode != 0
    assert "unset TRITON_INTERPRET" in result.stderr
