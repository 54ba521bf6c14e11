"""Adjoint experiments: weights with a profile across depth, and the gradient error of the reverse pass vs depth N.

Depth profiles: with residual scale 1/N (``enable_adjoint(..., residual_scale="1/L")``) a stack
``x_{n+1} = x_n + f(x_n, θ_n)/N`` discretises the ODE ``ẋ = f(x, θ(t))`` when θ_n = θ(n/N) for a smooth θ; the
reverse pass then converges as N grows (Sander et al., NeurIPS 2022). ``"smooth"`` sets every weight matrix to
θ(t) = A·cos(πt/2) + B·sin(πt/2) with A, B Gaussian; ``"iid"`` draws each layer's matrices independently. Entries
have standard deviation ``gain/√fan_in``, so each branch has gain about ``gain``. LayerNorm parameters and biases
are left alone.

The experiment (run by ``scripts/reproduce_adjoint.py``): the stacks are small pre-LN encoders (ViT layers,
hidden 16, 17 tokens) in float64, with an O(1) residual stream and weight matrices of gain ``gain`` either smooth
in depth or i.i.d. across layers. Each is trained by exact backprop and by the adjoint (Euler, Heun); the error is
‖g_adjoint − g_exact‖ / ‖g_exact‖ over all parameters, as returned by :func:`sinkhorn_hf.probe_adjoint`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from sinkhorn_hf.adjoint import enable_adjoint, find_stacks, probe_adjoint
from sinkhorn_hf.atomic_files import write_text_atomic

PROFILES = ("smooth", "iid")


@torch.no_grad()
def set_depth_profile(model: nn.Module, profile: str, gain: float = 1.0, seed: int = 0) -> None:
    """Overwrite the weight matrices of every residual stack of ``model`` with a ``profile`` across depth."""
    if profile not in PROFILES:
        raise ValueError(f"unknown depth profile {profile!r}; choose one of {', '.join(PROFILES)}.")
    generator = torch.Generator().manual_seed(seed)
    for stack in find_stacks(model):
        layers = list({id(m): m for m in stack.positions}.values())
        depth = len(layers)
        for name, first in layers[0].named_parameters():
            if first.dim() < 2:
                continue
            std = gain / math.sqrt(first.shape[-1])

            def draw(shape=first.shape, std=std) -> torch.Tensor:
                return torch.randn(shape, generator=generator, dtype=torch.float64) * std

            a, b = draw(), draw()
            for n, layer in enumerate(layers):
                t = n / max(depth - 1, 1)
                value = a * math.cos(math.pi * t / 2) + b * math.sin(math.pi * t / 2) if profile == "smooth" else draw()
                layer.get_parameter(name).copy_(value)


# name -> (weight profile across depth, residual scale as a function of N, label)
SETTINGS = {
    "smooth": ("smooth", lambda n: 1.0 / n, "smooth θ(n/N), scale 1/N"),
    "iid": ("iid", lambda n: 1.0 / n, "i.i.d., scale 1/N"),
    "iid-sqrt": ("iid", lambda n: n**-0.5, "i.i.d., scale 1/√N"),
}
SCHEMES = ("euler", "heun")


@dataclass
class Point:
    setting: str
    depth: int
    scheme: str
    grad_rel_error: float
    max_reconstruction_error: float


def ode_stack(depth: int, profile: str, gain: float = 2.0, seed: int = 0):
    """A float64 pre-LN encoder of ``depth`` layers with the given weight profile, and an input batch."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=16,
        num_hidden_layers=depth,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=16,
        patch_size=4,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = ViTModel(config, add_pooling_layer=False).double().eval()
    set_depth_profile(model, profile, gain=gain, seed=seed + 1)
    generator = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():  # an O(1) stream in every token (at init the CLS token is ~0.02)
        model.embeddings.position_embeddings.normal_(generator=generator)
        model.embeddings.cls_token.normal_(generator=generator)
    pixels = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=generator)
    return model, {"pixel_values": pixels}


def measure(setting: str, depth: int, scheme: str, gain: float = 2.0) -> Point:
    profile, scale, _ = SETTINGS[setting]
    model, batch = ode_stack(depth, profile, gain)
    enable_adjoint(model, scheme, residual_scale=scale(depth))
    probe = probe_adjoint(model, batch)
    return Point(setting, depth, scheme, probe.grad_rel_error, max(probe.chained_errors))


def run(depths: list[int], out: Path, gain: float = 2.0, settings: list[str] | None = None) -> list[Point]:
    """Measure every (setting, depth, scheme), resuming from ``out/results.json``; write a table and a plot."""
    settings = list(settings or SETTINGS)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    done = [Point(**p) for p in json.loads(results_path.read_text())] if results_path.exists() else []
    keys = {(p.setting, p.depth, p.scheme) for p in done}
    todo = [(s, n, k) for s in settings for n in depths for k in SCHEMES if (s, n, k) not in keys]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the matrices are tiny: more threads only wait on each other
    try:
        for setting, depth, scheme in tqdm(todo, desc="adjoint gradient error"):
            done.append(measure(setting, depth, scheme, gain))
            write_text_atomic(results_path, json.dumps([asdict(p) for p in done], indent=1))
    finally:
        torch.set_num_threads(threads)
    points = [p for p in done if p.depth in depths and p.setting in settings]
    write_text_atomic(out / "table.md", table(points, depths))
    plot(points, out / "adjoint_error.png")
    return points


def table(points: list[Point], depths: list[int]) -> str:
    """Markdown: one row per (setting, scheme), one column per depth, relative gradient errors."""
    lookup = {(p.setting, p.scheme, p.depth): p.grad_rel_error for p in points}
    settings = [s for s in SETTINGS if any(p.setting == s for p in points)]
    lines = [
        "| weights, residual scale | scheme | " + " | ".join(f"N={n}" for n in depths) + " |",
        "|---|---|" + "---|" * len(depths),
    ]
    for setting in settings:
        for scheme in SCHEMES:
            cells = [f"{lookup[(setting, scheme, n)]:.2e}" for n in depths]
            lines.append(f"| {SETTINGS[setting][2]} | {scheme} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(points: list[Point], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for setting in SETTINGS:
        for scheme, style in zip(SCHEMES, ("-o", "--s"), strict=True):
            series = sorted((p.depth, p.grad_rel_error) for p in points if (p.setting, p.scheme) == (setting, scheme))
            if series:
                ax.loglog(*zip(*series, strict=True), style, label=f"{scheme}, {SETTINGS[setting][2]}")
    ax.set_xlabel("depth N")
    ax.set_ylabel("relative gradient error")
    ax.set_title("Adjoint gradient error vs depth")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
