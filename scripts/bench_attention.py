"""Time and peak memory of Sinkhorn attention against eager SoftMax and SDPA, as ratios to SDPA.

    python scripts/bench_attention.py --sizes 128 512 2048 8192 --iterations 1 3 5 --batch 4 --heads 12
    python scripts/bench_attention.py --sizes 512 --repeats 5 --no-memory           # timing only
    python scripts/bench_attention.py --streaming-check                              # B=1, H=12, N=16384
    python scripts/bench_attention.py --sizes 512 2048 --compile                     # torch.compile on for all
    python scripts/bench_attention.py --sizes 512 2048 --padded                      # a padded batch, as in training
    python scripts/bench_attention.py --sizes 512 2048 8192 --device cuda            # on a GPU
    python scripts/bench_attention.py --device cuda --dtype bfloat16 --sizes 512 2048 8192 16384 --batch 4

Time: forward (no grad) and forward+backward of one attention call on random (B, H, N, D) inputs of ``--dtype``
(float32 by default), best of ``--repeats`` runs, every method of a size measured in this process with the runs
interleaved. ``--padded`` gives every method the mask of a padded batch (key lengths N, 0.8N, 0.6N, N, ...:
SDPA and eager SoftMax a (B, 1, N, N) bool mask, Sinkhorn the same mask and the valid queries), as transformers
hands it to attention in training on padded text. Sinkhorn goes through
``sinkhorn_hf.attention.routes.sinkhorn_attention`` on the PyTorch routes (``sinkhorn_backend="torch"``) with the
default route for that length (SDPA for K=1, dense below the streaming threshold, streaming above). With
``--device cuda`` there are also rows for SDPA pinned to its flash and its memory-efficient kernels
(``torch.nn.attention.sdpa_kernel``; flash needs 16-bit inputs, so it is skipped in float32) and for the fused
Triton kernels (``sinkhorn_backend="triton"``) at each K.

Peak memory: each (size, method) runs once more in its own
process; after the inputs exist, VmHWM is reset (/proc/self/clear_refs) and the peak resident memory of a
forward and then a forward+backward is read back minus the resident memory before them (glibc returns freed
tensors to the system at once there), so it is what the call itself needs. With ``--device cuda`` the clock waits
for the device (``torch.cuda.synchronize``) and peak memory is ``torch.cuda.max_memory_allocated`` above the
inputs, measured in this process. ``--compile`` puts every method (SDPA, eager and Sinkhorn) through
``torch.compile``; compilation happens in the untimed warm-up. A configuration whose estimated
memory would exceed ``--memory-limit-gib`` is skipped with the reason printed. Results go to ``--output``
(JSON, one entry per size, written atomically: a killed run resumes at the next size; a resume with other settings
is refused) and the table is printed as Markdown.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from sinkhorn_hf.atomic_files import write_json_atomic
from sinkhorn_hf.attention import SinkhornSettings
from sinkhorn_hf.attention.routes import block_size_for, sinkhorn_attention
from sinkhorn_hf.attention.settings import RouteOptions
from sinkhorn_hf.attention.streaming import StreamingSinkhornAttention

_MIB = 2**20
MIN_RUN_S = 0.2  # shorter timed runs loop over the call


SDPA_KERNELS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-mem": "EFFICIENT_ATTENTION"}  # name -> SDPBackend member


BASELINES = {  # --baselines name -> method prefix
    "log-streaming": "logstream",  # the log-domain streaming route (before the kernel domain), forced
    "naive-compiled": "naive",  # the textbook log-domain loop on the whole score matrix, through torch.compile
    "matmul-floor": "floor",  # (Q Kᵀ) V alone: the two products every route that forms the scores pays
}


def _methods(iterations: list[int], device: str = "cpu", baselines: tuple[str, ...] = ()) -> list[str]:
    sinkhorn = [f"sinkhorn{k}" for k in iterations]
    sinkhorn += [f"{BASELINES[name]}{k}" for name in baselines if name != "matmul-floor" for k in iterations if k > 1]
    sinkhorn += ["floor"] if "matmul-floor" in baselines else []
    if device != "cuda":
        return ["sdpa", "eager"] + sinkhorn
    return ["sdpa", *SDPA_KERNELS, "eager"] + sinkhorn + [f"triton{k}" for k in iterations]


def _route(method: str, n: int, dim: int) -> str:
    if method.startswith("triton"):
        return "triton"
    if not method.startswith("sinkhorn"):
        return ""
    k = int(method.removeprefix("sinkhorn"))
    if k == 1:
        return "sdpa"
    return "dense" if block_size_for(SinkhornSettings(iterations=k), n, n, dim) is None else "streaming"


def _label(method: str, n: int, dim: int) -> str:
    if method.startswith("logstream"):
        return f"log-domain streaming K={method.removeprefix('logstream')}"
    if method.startswith("naive"):
        return f"naive log-domain loop, compiled, K={method.removeprefix('naive')}"
    if method == "floor":
        return "(Q Kᵀ) V alone, no normalisation"
    for prefix in ("sinkhorn", "triton"):
        if method.startswith(prefix):
            return f"sinkhorn K={method.removeprefix(prefix)} ({_route(method, n, dim)})"
    return method


@functools.cache
def padding(batch: int, n: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """allowed (B, 1, N, N) bool and query_valid (B, 1, N, 1) of a batch with key lengths N, 0.8N, 0.6N, N, ..."""
    lengths = torch.tensor([round(n * (1.0, 0.8, 0.6)[i % 3]) for i in range(batch)], device=device)
    valid = torch.arange(n, device=device)[None] < lengths[:, None]
    return valid[:, None, None, :].expand(batch, 1, n, n).contiguous(), valid[:, None, :, None]


def _attention(method: str, compile_: bool = False, padded: bool = False):
    """fn(q, k, v) -> output (B, H, N, D), through torch.compile if ``compile_``, masked as a padded batch if
    ``padded``."""

    def masks(q):
        return padding(q.shape[0], q.shape[-2], str(q.device)) if padded else (None, None)

    if method == "sdpa":

        def fn(q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=masks(q)[0])

    elif method in SDPA_KERNELS:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, SDPA_KERNELS[method])

        def fn(q, k, v):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=masks(q)[0])

    elif method == "eager":

        def fn(q, k, v):
            scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
            allowed = masks(q)[0]
            scores = scores if allowed is None else scores.masked_fill(~allowed, float("-inf"))
            return torch.matmul(torch.softmax(scores, -1), v)

    elif method.startswith("logstream"):
        iterations = int(method.removeprefix("logstream"))

        def fn(q, k, v):
            settings = SinkhornSettings(iterations=iterations, backend="torch", streaming=True)
            allowed, query_valid = masks(q)
            n, scale = q.shape[-2], q.shape[-1] ** -0.5
            options = RouteOptions(settings, scale, block_size_for(settings, n, n, q.shape[-1]))
            return StreamingSinkhornAttention.apply(q, k, v, None, allowed, query_valid, options)

    elif method == "floor":

        def fn(q, k, v):
            return torch.matmul(q @ k.transpose(-1, -2), v)

    elif method.startswith("naive"):
        return torch.compile(_naive_loop(int(method.removeprefix("naive")), masks))
    else:
        prefix = "triton" if method.startswith("triton") else "sinkhorn"
        iterations = int(method.removeprefix(prefix))
        settings = SinkhornSettings(iterations=iterations, backend="triton" if prefix == "triton" else "torch")

        def fn(q, k, v):
            allowed, query_valid = masks(q)
            return sinkhorn_attention(q, k, v, allowed=allowed, query_valid=query_valid, settings=settings)[0]

    if not compile_:
        return fn
    torch._dynamo.config.trace_autograd_ops = True  # the streaming backward differentiates its inner SDPA call
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(fn)


def _naive_loop(iterations: int, masks):
    """fn(q, k, v): K alternating row and column normalisations of the whole log score matrix (the column target
    n_q / n_k over the valid queries), then A V: the loop a user would write and hand to torch.compile."""

    def fn(q, k, v):
        allowed, query_valid = masks(q)
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        if allowed is not None:
            scores = scores.masked_fill(~allowed, -1e30)
        for step in range(iterations):
            if step % 2 == 0:
                scores = scores - scores.logsumexp(-1, keepdim=True)
            elif query_valid is None:
                scores = scores - scores.logsumexp(-2, keepdim=True)
            else:
                outside = torch.where(query_valid, 0.0, -1e30)
                n_q = query_valid.sum(-2, keepdim=True)
                scores = scores - (scores + outside).logsumexp(-2, keepdim=True) + (n_q / q.shape[-2]).log()
        return torch.matmul(scores.exp(), v)

    return fn


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _estimated_bytes(method: str, n: int, batch: int, heads: int, dim: int, item: int = 4) -> int:
    """Rough peak of one forward+backward: inputs, gradients and outputs (``item`` bytes an element), plus four
    float32 score matrices where the method materialises them."""
    vectors = 8 * batch * heads * n * dim * item
    scores = batch * heads * n * n * 4
    materialises = method in ("eager", "floor") or method.startswith("naive") or _route(method, n, dim) == "dense"
    return vectors + (4 * scores if materialises else 0)


def _inputs(n: int, batch: int, heads: int, dim: int, seed: int = 0, device: str = "cpu", dtype: str = "float32"):
    generator = torch.Generator().manual_seed(seed)
    shape, dtype = (batch, heads, n, dim), getattr(torch, dtype)
    q, k, v, upstream = (torch.randn(shape, generator=generator).to(device, dtype) for _ in range(4))
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), upstream


def _forward(fn, q, k, v) -> None:
    with torch.no_grad():
        fn(q, k, v)


def _train(fn, q, k, v, upstream) -> None:
    fn(q, k, v).backward(upstream)
    q.grad = k.grad = v.grad = None


def time_size(methods: list[str], n: int, args) -> dict[str, dict[str, float]]:
    """Best-of-``args.repeats`` forward and forward+backward seconds per method, runs interleaved. A run that
    takes under MIN_RUN_S repeats the call in a loop (and reports the time per call), so that short calls are
    not at the mercy of the clock and thread wake-ups."""
    q, k, v, upstream = _inputs(n, args.batch, args.heads, args.dim, device=args.device, dtype=args.dtype)
    fns = {m: _attention(m, args.compile, args.padded) for m in methods}
    best = {m: {"forward_s": float("inf"), "train_s": float("inf")} for m in methods}
    loops = {}
    for method, fn in fns.items():  # warm-up (thread pools, first-call dispatch), timed to size the loops
        _forward(fn, q, k, v)  # with --compile, the inference graph compiles here
        _train(fn, q, k, v, upstream)
        _synchronize(args.device)
        start = time.perf_counter()
        _train(fn, q, k, v, upstream)
        _synchronize(args.device)
        loops[method] = max(1, int(MIN_RUN_S / max(time.perf_counter() - start, 1e-6)))
    for _ in range(args.repeats):
        for method, fn in fns.items():
            _synchronize(args.device)
            start = time.perf_counter()
            for _ in range(loops[method]):
                _forward(fn, q, k, v)
            _synchronize(args.device)
            middle = time.perf_counter()
            for _ in range(loops[method]):
                _train(fn, q, k, v, upstream)
            _synchronize(args.device)
            end = time.perf_counter()
            best[method]["forward_s"] = min(best[method]["forward_s"], (middle - start) / loops[method])
            best[method]["train_s"] = min(best[method]["train_s"], (end - middle) / loops[method])
    return best


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_cuda_memory(method: str, n: int, args) -> dict[str, float]:
    """Peak allocated GPU memory (MiB) of a forward, then of a forward+backward, above the inputs."""
    fn = _attention(method, args.compile, args.padded)
    q, k, v, upstream = _inputs(n, args.batch, args.heads, args.dim, device="cuda", dtype=args.dtype)
    _train(fn, q, k, v, upstream)  # compile (and warm up) outside the measurement
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _forward(fn, q, k, v)
    torch.cuda.synchronize()
    forward = torch.cuda.max_memory_allocated() - before
    _train(fn, q, k, v, upstream)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"forward_mib": forward / _MIB, "train_mib": (peak - before) / _MIB, "total_mib": peak / _MIB}


def measure_memory_here(
    method: str, n: int, batch: int, heads: int, dim: int, compile_: bool, padded: bool
) -> dict[str, float]:
    """Peak resident memory (MiB) of a forward, then of a forward+backward, above the memory before them."""
    fn = _attention(method, compile_, padded)
    q, k, v, upstream = _inputs(n, batch, heads, dim)
    if padded:  # the masks are inputs: made before the measurement
        padding(batch, n, "cpu")
    if compile_:  # compile outside the measurement
        _forward(fn, q, k, v)
        _train(fn, q, k, v, upstream)
    before = _rss("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
    _forward(fn, q, k, v)
    forward = _rss("VmHWM") - before
    _train(fn, q, k, v, upstream)
    return {
        "forward_mib": forward / _MIB,
        "train_mib": (_rss("VmHWM") - before) / _MIB,
        "total_mib": _rss("VmHWM") / _MIB,
    }


def measure_memory(method: str, n: int, batch: int, heads: int, dim: int, args) -> dict[str, float]:
    """measure_memory_here in a fresh process (CPU), or measure_cuda_memory here."""
    if args.device == "cuda":
        return measure_cuda_memory(method, n, args)
    command = [sys.executable, __file__, "--child", method, str(n), str(batch), str(heads), str(dim)]
    command += ["--threads", str(torch.get_num_threads())] + (["--compile"] if args.compile else [])
    command += ["--padded"] if args.padded else []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"memory run of {method} at N={n} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _ratio(value: float | None, base: float | None) -> str:
    return "—" if value is None or not base else f"{value / base:.2f}"


def _number(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def render(results: dict, args) -> str:
    if args.device == "cuda":
        where = torch.cuda.get_device_name()
    else:
        where = f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    compiled = "torch.compile on for every method" if args.compile else "eager"
    compiled += ", padded batch (key lengths N, 0.8N, 0.6N, N)" if args.padded else ""
    lines = [
        f"B={args.batch}, H={args.heads}, D={args.dim}, {args.dtype}, torch {torch.__version__}, {where}, {compiled}; "
        f"time = best of {args.repeats}; ratios are to SDPA at the same N",
        "",
        "| N | method | fwd ms | fwd ×SDPA | fwd+bwd ms | fwd+bwd ×SDPA | peak MiB fwd+bwd | peak ×SDPA |",
        "|---|---|---|---|---|---|---|---|",
    ]
    skipped = []
    for n_text, row in results.items():
        n = int(n_text)
        base = row.get("sdpa", {})
        for method in _methods(args.iterations, args.device, tuple(args.baselines)):
            entry = row.get(method)
            if entry is None:
                continue
            if "skipped" in entry:
                skipped.append(f"N={n} {_label(method, n, args.dim)}: {entry['skipped']}")
                lines.append(f"| {n} | {_label(method, n, args.dim)} | — | — | — | — | — | — |")
                continue
            fwd, train, peak = (entry.get(key) for key in ("forward_s", "train_s", "train_mib"))
            lines.append(
                f"| {n} | {_label(method, n, args.dim)} | {_number(fwd * 1e3)} | {_ratio(fwd, base.get('forward_s'))} "
                f"| {_number(train * 1e3)} | {_ratio(train, base.get('train_s'))} | {_number(peak)} "
                f"| {_ratio(peak, base.get('train_mib'))} |"
            )
    if skipped:
        lines += ["", "Skipped:"] + [f"- {reason}" for reason in skipped]
    return "\n".join(lines)


def settings_of(args) -> dict:
    """What a results file's numbers depend on (sizes and K may grow on resume; the rest may not change)."""
    keys = (
        "batch",
        "heads",
        "dim",
        "threads",
        "repeats",
        "device",
        "dtype",
        "compile",
        "padded",
        "memory",
        "baselines",
    )
    return {key: getattr(args, key) for key in keys} | {"torch": torch.__version__}


def run(args) -> dict:
    path = Path(args.output)
    stored = json.loads(path.read_text()) if path.is_file() else {"settings": settings_of(args), "sizes": {}}
    if stored.get("settings") != settings_of(args):
        differences = {
            key: (stored.get("settings", {}).get(key), value)
            for key, value in settings_of(args).items()
            if stored.get("settings", {}).get(key) != value
        }
        raise SystemExit(
            f"bench_attention.py: {path} holds results measured with other settings ({differences}: stored, now); "
            "pass another --output or remove it"
        )
    results = stored["sizes"]
    limit = args.memory_limit_gib * 2**30
    methods = _methods(args.iterations, args.device, tuple(args.baselines))
    item = getattr(torch, args.dtype).itemsize
    for n in tqdm(args.sizes, desc="sizes"):
        if str(n) in results:
            continue  # done by an earlier (killed) run
        runnable, row = [], {}
        for method in methods:
            need = _estimated_bytes(method, n, args.batch, args.heads, args.dim, item)
            if method == "sdpa-flash" and item > 2:
                row[method] = {"skipped": f"SDPA's flash kernel takes 16-bit inputs only, not {args.dtype}"}
            elif method == "sdpa-flash" and args.padded:
                row[method] = {"skipped": "SDPA's flash kernel takes no attention mask (--padded)"}
            elif need > limit:
                row[method] = {
                    "skipped": f"needs about {need / 2**30:.1f} GiB (score matrices of "
                    f"{args.batch * args.heads * n * n * 4 / 2**30:.1f} GiB), over --memory-limit-gib "
                    f"{args.memory_limit_gib}"
                }
            else:
                runnable.append(method)
        for method, timing in time_size(runnable, n, args).items():
            row[method] = timing
        if args.memory:
            for method in tqdm(runnable, desc=f"memory N={n}", leave=False):
                row[method].update(measure_memory(method, n, args.batch, args.heads, args.dim, args))
        results[str(n)] = row
        write_json_atomic(path, stored, indent=1)
    return results


def streaming_check(args) -> str:
    """Peak memory of Sinkhorn forward+backward at B=1, H=12, N=16384 (streaming), per K, vs SDPA."""
    n, batch, heads = 16384, 1, 12
    lines = [
        f"Streaming check: B={batch}, H={heads}, N={n}, D={args.dim}, float32 (peak resident memory of the "
        "whole process, and above the inputs)",
        "",
        "| method | peak MiB above inputs | process peak MiB |",
        "|---|---|---|",
    ]
    for method in tqdm(["sdpa"] + [f"sinkhorn{k}" for k in args.iterations], desc="streaming check"):
        memory = measure_memory(method, n, batch, heads, args.dim, args)
        label = _label(method, n, args.dim)
        lines.append(f"| {label} | {memory['train_mib']:.0f} | {memory['total_mib']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 512, 2048, 8192], help="sequence lengths N")
    parser.add_argument("--iterations", type=int, nargs="+", default=[1, 3, 5], help="Sinkhorn iterations K")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--dim", type=int, default=64, help="head dimension D")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per method (best is kept)")
    parser.add_argument("--memory-limit-gib", type=float, default=8.0, help="skip configurations needing more")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory runs")
    parser.add_argument("--output", default="bench_attention.json", help="results file (a killed run resumes)")
    parser.add_argument("--streaming-check", action="store_true", help="only the B=1, H=12, N=16384 memory check")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="dtype of q, k, v (CPU memory runs: float32)",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile every method (SDPA, eager, Sinkhorn)")
    parser.add_argument("--padded", action="store_true", help="mask every method as a padded batch")
    parser.add_argument(
        "--baselines",
        nargs="*",
        choices=sorted(BASELINES),
        default=[],
        help="extra arms: at each K > 1, log-streaming (the log-domain streaming route, forced) and naive-compiled "
        "(the naive log-domain loop through torch.compile); matmul-floor, once: (Q Kᵀ) V with no normalisation",
    )
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available to torch here")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        method, *numbers = args.child
        print(json.dumps(measure_memory_here(method, *map(int, numbers), args.compile, args.padded)))
        return
    if args.streaming_check:
        print(streaming_check(args))
        return
    print(render(run(args), args))


if __name__ == "__main__":
    main()
