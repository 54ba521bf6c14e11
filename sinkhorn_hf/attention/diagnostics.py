"""How far attention matrices are from doubly stochastic (the paper's observation: trained SoftMax attention
drifts toward it), per layer and head, over valid tokens only."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .. import compat
from ..atomic_files import save_figure_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass
class MarginalReport:
    """Per layer, per head (L, H): worst |row sum - 1| and the spread (std) and worst deviation of column sums
    from their target n_q/n_k, over valid tokens, averaged over the batch."""

    row_error: Tensor
    column_std: Tensor
    column_error: Tensor

    def summary(self) -> list[dict[str, float]]:
        """One dict per layer, averaged over heads."""
        return [
            {
                "layer": layer,
                "row_error": float(self.row_error[layer].mean()),
                "column_std": float(self.column_std[layer].mean()),
                "column_error": float(self.column_error[layer].mean()),
            }
            for layer in range(self.row_error.shape[0])
        ]


def marginal_report(attentions: tuple[Tensor, ...], valid: Tensor | None = None) -> MarginalReport:
    """Marginals of self-attention matrices ``attentions[l]`` (B, H, N, N); ``valid`` (B, N) bool or None."""
    rows, stds, cols = [], [], []
    for attention in attentions:
        attention = attention.detach().double()
        batch, _, n, _ = attention.shape
        mask = torch.ones(batch, n, dtype=torch.bool) if valid is None else valid.bool().cpu()
        mask = mask.to(attention.device)
        count = mask.sum(-1).clamp(min=1).double()[:, None]  # (B, 1)
        keep = mask[:, None, :, None] & mask[:, None, None, :]
        block = attention * keep
        row_dev = (block.sum(-1) - 1).abs().masked_fill(~mask[:, None], 0).amax(-1)
        col_sums = block.sum(-2)  # target is n_valid / n_valid = 1 for self-attention
        col_dev = (col_sums - 1).masked_fill(~mask[:, None], 0)
        col_std = ((col_dev**2).sum(-1) / count).sqrt()
        rows.append(row_dev.mean(0))
        stds.append(col_std.mean(0))
        cols.append(col_dev.abs().amax(-1).mean(0))
    return MarginalReport(torch.stack(rows).float(), torch.stack(stds).float(), torch.stack(cols).float())


@contextmanager
def _attention_implementation(model: torch.nn.Module, name: str):
    previous = compat.config_attn_implementation(model.config)
    model.set_attn_implementation(name)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


@torch.no_grad()
def softmax_marginals(model: torch.nn.Module, **inputs: Tensor) -> MarginalReport:
    """Run ``model`` with transformers' own SoftMax (eager) attention and report how doubly stochastic it is.

    ``inputs`` are the model's forward arguments; padding is read from ``attention_mask`` when given.
    """
    with _attention_implementation(model, "eager"):
        outputs = model(**inputs, output_attentions=True)
    return marginal_report(outputs.attentions, inputs.get("attention_mask"))


def column_spread_figure(reports: MarginalReport | Mapping[str, MarginalReport], title: str = "") -> Figure:
    """A box plot of the column-sum spread per layer, one box over heads per layer, side by side for each
    labelled report of a mapping (e.g. ``{"SoftMax": a, "Sinkhorn K=3": b}``). Layout keeps every label inside."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    labelled = {"": reports} if isinstance(reports, MarginalReport) else dict(reports)
    layers = max(report.column_std.shape[0] for report in labelled.values())
    width = 0.8 / len(labelled)
    fig = Figure(figsize=(6.4, 3.8), dpi=120, layout="constrained")
    ax = fig.subplots()
    handles = []
    for index, (label, report) in enumerate(labelled.items()):
        color = f"C{index}"
        offset = (index - (len(labelled) - 1) / 2) * width
        positions = [layer + offset for layer in range(report.column_std.shape[0])]
        ax.boxplot(
            [heads.numpy() for heads in report.column_std],
            positions=positions,
            widths=width * 0.85,
            patch_artist=True,
            boxprops={"facecolor": color, "alpha": 0.6},
            medianprops={"color": "black"},
            manage_ticks=False,
        )
        handles.append(Patch(facecolor=color, alpha=0.6, label=label))
    ax.set_xticks(range(layers), [str(layer) for layer in range(layers)])
    ax.set_xlim(-0.6, layers - 0.4)
    ax.set_xlabel("layer (one box over its heads)")
    ax.set_ylabel("std of column sums\n(0 = doubly stochastic)")
    if len(labelled) > 1:
        ax.legend(handles=handles, fontsize="small")
    ax.set_title(textwrap.fill(title or "SoftMax attention: distance to doubly stochastic", 60), fontsize="medium")
    return fig


def plot_column_spread(
    reports: MarginalReport | Mapping[str, MarginalReport], path: str | Path, title: str = ""
) -> Path:
    """Save :func:`column_spread_figure` of ``reports`` as a PNG at ``path`` (written atomically)."""
    return save_figure_atomic(column_spread_figure(reports, title), path, format="png")
