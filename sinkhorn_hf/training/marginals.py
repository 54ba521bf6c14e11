"""Track, during training, how far a model's SoftMax attention is from doubly stochastic (the Sinkformers paper's
Figure 1: trained SoftMax attention drifts toward it), on a fixed evaluation batch, every N steps.

Per layer l: ``softmax_column_std`` = the std of SoftMax column sums c_j = Σ_i A_ij over valid tokens j (their
target is 1; the numbers are :func:`~sinkhorn_hf.attention.diagnostics.marginal_report`'s, as
``sinkhorn-hf diagnose`` prints them), ``softmax_column_error`` = max_j |c_j − 1|; for a model whose own attention
is ``"sinkhorn"``, ``sinkhorn_column_error`` = the same max for its Sinkhorn attention. Each record also keeps
quantiles of the sorted column sums of every (example, head, valid column) per layer, for the picture.

Wiring into a training loop::

    tracker = MarginalTracker(model, eval_batch, every=100)
    for step in ...:  # after the optimizer step
        record = tracker.maybe_track(step)   # a dict, or None between tracked steps
    paths = tracker.write(output_dir)         # {"json": ..., "png": ...}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import compat
from ..atomic_files import save_figure_atomic, write_json_atomic
from ..attention.diagnostics import marginal_report

QUANTILES = 101  # points of the sorted column-sum curve kept per layer and step (0 %, 1 %, ..., 100 %)
AttentionsFn = Callable[[nn.Module, Mapping[str, Tensor]], tuple[Tensor, ...]]


@contextmanager
def _implementation(model: nn.Module, name: str):
    """Run ``model`` with attention implementation ``name`` (and in eval mode), then restore both."""
    previous, training = compat.config_attn_implementation(model.config), model.training
    model.eval()
    if name != previous:
        model.set_attn_implementation(name)
    try:
        yield model
    finally:
        if name != previous:
            model.set_attn_implementation(previous)
        model.train(training)


def transformers_attentions(model: nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, ...]:
    """SoftMax attention matrices (L × (B, H, N, N)) of a transformers model, run with eager attention."""
    with _implementation(model, "eager"):
        return model(**batch, output_attentions=True).attentions


def _own_attentions(model: nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, ...]:
    with _implementation(model, compat.config_attn_implementation(model.config)):
        return model(**batch, output_attentions=True).attentions


def sorted_column_sums(attention: Tensor, valid: Tensor | None) -> Tensor:
    """Column sums c_j = Σ_{i valid} A_ij of ``attention`` (B, H, N, N) at every valid column j (``valid`` (B, N)
    bool or None), over all examples and heads, sorted ascending: (Σ_b H·n_b,) float64."""
    attention = attention.detach().double()
    batch, heads, n, _ = attention.shape
    mask = torch.ones(batch, n, dtype=torch.bool) if valid is None else valid.bool().cpu()
    mask = mask.to(attention.device)
    sums = (attention * mask[:, None, :, None]).sum(-2)  # (B, H, N)
    return sums[mask[:, None, :].expand(batch, heads, n)].sort().values.cpu()


def _quantiles(values: Tensor) -> list[float]:
    return torch.quantile(values, torch.linspace(0, 1, QUANTILES, dtype=values.dtype)).tolist()


class MarginalTracker:
    """Measure ``model``'s attention marginals on a fixed ``batch`` (its forward arguments; padding read from
    ``attention_mask``) at step 0 and every ``every`` steps; ``records`` holds one dict per tracked step.

    ``attentions_fn(model, batch)`` returns the SoftMax attention matrices of a model that is not a transformers
    one (default: :func:`transformers_attentions`).
    """

    def __init__(
        self,
        model: nn.Module,
        batch: Mapping[str, Tensor],
        every: int,
        attentions_fn: AttentionsFn | None = None,
        title: str = "",
    ) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be an integer ≥ 1 (track every N optimizer steps), got {every!r}.")
        if not batch:
            raise ValueError("batch must hold the model's forward arguments (e.g. input_ids, attention_mask).")
        self.model, self.batch, self.every, self.title = model, dict(batch), every, title
        self.attentions_fn = attentions_fn or transformers_attentions
        self.records: list[dict] = []

    def _sinkhorn(self) -> bool:
        config = getattr(self.model, "config", None)
        return config is not None and compat.config_attn_implementation(config) == "sinkhorn"

    @torch.no_grad()
    def track(self, step: int) -> dict:
        """Measure now and append the record ``{"step", "layers": [{"layer", "softmax_column_std",
        "softmax_column_error"[, "sinkhorn_column_error"]}], "column_sum_quantiles": [per layer, QUANTILES]}``."""
        device = next(self.model.parameters()).device
        batch = {name: value.to(device) if isinstance(value, Tensor) else value for name, value in self.batch.items()}
        valid = batch.get("attention_mask")
        attentions = self.attentions_fn(self.model, batch)
        report = marginal_report(attentions, valid)
        layers = [
            {
                "layer": row["layer"],
                "softmax_column_std": row["column_std"],
                "softmax_column_error": row["column_error"],
            }
            for row in report.summary()
        ]
        if self._sinkhorn():
            own = marginal_report(_own_attentions(self.model, batch), valid).summary()
            for layer, row in zip(layers, own, strict=True):
                layer["sinkhorn_column_error"] = row["column_error"]
        record = {
            "step": int(step),
            "layers": layers,
            "column_sum_quantiles": [_quantiles(sorted_column_sums(a, valid)) for a in attentions],
        }
        self.records.append(record)
        return record

    def maybe_track(self, step: int) -> dict | None:
        """Track at step 0 and every ``every`` steps (once per step); else None."""
        if step % self.every or (self.records and self.records[-1]["step"] == step):
            return None
        return self.track(step)

    def write(self, output_dir: str | Path, plot: bool = True) -> dict[str, Path]:
        """Write ``attention_marginals.json`` (the records) and, if ``plot``, ``attention_marginals.png`` (sorted
        column sums across training) into ``output_dir``, atomically; returns their paths."""
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        json_path = write_json_atomic(
            output_dir / "attention_marginals.json", {"quantiles": QUANTILES, "records": self.records}, indent=1
        )
        if not plot:
            return {"json": json_path}
        return {"json": json_path, "png": plot_drift(self.records, output_dir / "attention_marginals.png", self.title)}


def flat_metrics(record: dict, prefix: str = "attention_marginals") -> dict[str, float]:
    """A record's per-layer values as flat scalar logs: ``{prefix}/layer_{l}/{name}: value``."""
    return {
        f"{prefix}/layer_{layer['layer']}/{name}": value
        for layer in record["layers"]
        for name, value in layer.items()
        if name != "layer"
    }


def plot_drift(records: list[dict], path: str | Path, title: str = "") -> Path:
    """PNG of sorted SoftMax column sums across training: one panel per layer, one curve per tracked step
    (colour = step), x = rank among the valid columns, y = column sum (1 everywhere = doubly stochastic; log scale
    when some exceed 4); a last
    panel has each layer's column-sum std against the step."""
    if not records:
        raise ValueError("no tracked step to plot: call track() or maybe_track() first.")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_layers = len(records[0]["column_sum_quantiles"])
    columns = min(n_layers + 1, 4)
    rows = -(-(n_layers + 1) // columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(4.4 * columns + 1.2, 3.6 * rows), squeeze=False, layout="constrained"
    )
    colours = plt.get_cmap("viridis")
    steps = [record["step"] for record in records]
    norm = matplotlib.colors.Normalize(min(steps), max(max(steps), min(steps) + 1))
    ranks = torch.linspace(0, 1, QUANTILES).tolist()
    panels = list(axes.flat)
    for ax in panels[n_layers + 1 :]:
        ax.set_axis_off()
    spread = panels[n_layers]
    for layer in range(n_layers):
        spread.plot(steps, [record["layers"][layer]["softmax_column_std"] for record in records], marker=".", lw=1.2,
                    label=f"layer {layer}")  # fmt: skip
    spread.set_xlabel("training step")
    spread.set_ylabel("std of column sums")
    spread.set_title("spread vs step (0 = doubly stochastic)", fontsize=10)
    spread.set_ylim(bottom=0)
    spread.legend(fontsize=8)
    for layer, ax in enumerate(panels[:n_layers]):
        for record in records:
            ax.plot(ranks, record["column_sum_quantiles"][layer], color=colours(norm(record["step"])), lw=1.2)
        first, last = records[0]["layers"][layer], records[-1]["layers"][layer]
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        values = [value for record in records for value in record["column_sum_quantiles"][layer]]
        if max(values) > 4 and min(values) > 0:  # a few columns take most of the attention: spread the rest out
            ax.set_yscale("log")
        ax.set_title(
            f"layer {layer}: std {first['softmax_column_std']:.3f} → {last['softmax_column_std']:.3f}", fontsize=10
        )
        ax.set_xlabel("rank of column (fraction)")
        ax.set_ylabel("column sum")
    figure.colorbar(matplotlib.cm.ScalarMappable(norm, colours), ax=panels[:n_layers], label="training step")
    figure.suptitle(title or "SoftMax attention column sums during training (1 = doubly stochastic)", fontsize=11)
    return save_figure_atomic(figure, path, dpi=120, bbox_inches="tight")
