"""How far attention matrices are from doubly stochastic (the paper's observation: trained SoftMax attention
drifts toward it), per layer and head, over valid tokens only."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .. import compat


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


def plot_column_spread(report: MarginalReport, path: str | Path, title: str = "") -> Path:
    """Save a PNG of the column-sum spread per layer (box over heads)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.boxplot([layer.numpy() for layer in report.column_std], positions=range(len(report.column_std)))
    ax.set_xlabel("layer")
    ax.set_ylabel("std of column sums (0 = doubly stochastic)")
    ax.set_title(title or "SoftMax attention: distance to doubly stochastic")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
