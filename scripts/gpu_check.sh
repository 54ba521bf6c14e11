#!/usr/bin/env bash
# One command for a GPU machine, run from the repository root (caps: 200 s for the tests, 110 s per benchmark, so
# the whole stays under 8 minutes; the figures are unmeasured so far, no GPU having been lent):
#
#     scripts/gpu_check.sh [OUTPUT_FOLDER]        # default: $OUT, else gpu_check/
#
# 1. correctness on CUDA: the PyTorch routes (dense in the kernel and the log domain, streaming) and the Triton
#    kernels against the float64 reference (tests/attention/test_devices.py, tests/attention_triton, slow ones
#    included), report in pytest.txt;
# 2. speed and peak memory: scripts/bench_attention.py --device cuda at N = 512, 2048, 8192, K = 1 and 3, in
#    bfloat16 and float32 (SDPA, its flash and memory-efficient kernels, eager, the PyTorch routes, Triton),
#    tables in bench_<dtype>.md, results in bench_<dtype>.json (a run cut at its cap keeps the sizes it finished).
# The machine (nvidia-smi, torch and Triton versions) goes to machine.txt; summary.txt says which step passed.
# Each step's stderr goes to <step>.log. A step that fails or runs past its cap is recorded and the next one still
# runs; the exit status is 1 if any failed.
set -uo pipefail

out="${1:-${OUT:-gpu_check}}"
python="${PYTHON:-python}"
mkdir -p "$out"
status=0
summary="$out/summary.txt"
: > "$summary"

step() {  # step NAME SECONDS COMMAND...: run COMMAND under a time cap, stdout to $out/NAME.txt, stderr NAME.log
    local name="$1" cap="$2"
    shift 2
    local start=$SECONDS
    timeout --kill-after=10 "$cap" "$@" > "$out/$name.txt" 2> "$out/$name.log"
    local rc=$?
    echo "$name: exit $rc after $((SECONDS - start)) s (cap $cap s): $*" | tee -a "$summary"
    [ "$rc" -eq 0 ] || status=1
}

{
    nvidia-smi || echo "nvidia-smi not found"
    "$python" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__); print(torch.cuda.get_device_name())'
} > "$out/machine.txt" 2>&1
if ! "$python" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "no CUDA device visible to torch: nothing to check" | tee -a "$summary"
    exit 1
fi

step pytest 200 "$python" -m pytest -q -n 0 -m "" -p no:cacheprovider \
    tests/attention/test_devices.py tests/attention_triton
for dtype in bfloat16 float32; do
    rm -f "$out/bench_$dtype.json"  # a fresh measurement (bench_attention.py resumes from an existing file)
    step "bench_$dtype" 110 "$python" scripts/bench_attention.py --device cuda --dtype "$dtype" \
        --sizes 512 2048 8192 --iterations 1 3 --repeats 3 --memory-limit-gib 40 --output "$out/bench_$dtype.json"
    mv "$out/bench_$dtype.txt" "$out/bench_$dtype.md"
done
echo "results in $out" | tee -a "$summary"
exit "$status"
