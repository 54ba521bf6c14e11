"""The reversible coupling's trade-off on a pretrained encoder: change of function at step 0 against rebuild error,
by coupling λ, depth and precision, with the gradient agreement against exact backprop of the same coupled model.

    python scripts/reversible_coupling.py --model ../shared/models/all-MiniLM-L6-v2 --depths 6 12 24 \
        --couplings 1 0.5 0.25 0.1 --sentences 16 --out runs/reversible_coupling

Model: the pretrained MiniLM (6 layers) or, for depth L > 6, a BERT built from its config with L layers whose
layer n holds pretrained layer n mod 6 (pretrained weight scales at any depth). Batch: the first ``--sentences``
SST-2 dev sentences, padded, train mode (dropout replayed). Per (depth, λ, precision):

- ``step0``: the worst token's relative change of the encoder output, ``enable_adjoint(model, "reversible",
  coupling=λ)`` against the same model without it (what fine-tuning starts from);
- ``rebuild``: the worst layer's chained rebuild error (worst token, from the stack output down, as the adjoint
  rebuilds it; :func:`sinkhorn_hf.probe_adjoint`), float32 or under bf16 autocast;
- ``cosine``: the gradient cosine of every trainable parameter against exact backprop of the same coupled model.

Writes OUT/results.json and OUT/table.md (atomically) and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

import sinkhorn_hf  # noqa: F401  (registers attn_implementation="sinkhorn", applies stored couplings)
from sinkhorn_hf.adjoint import disable_adjoint, enable_adjoint, probe_adjoint
from sinkhorn_hf.adjoint.probe import relative_error
from sinkhorn_hf.atomic_files import write_text_atomic


def deep_pretrained(path: str, depth: int, attn: str = "sdpa") -> torch.nn.Module:
    """The pretrained model at ``path`` with ``depth`` layers, layer n holding pretrained layer n mod its depth."""
    pretrained = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, attn_implementation=attn)
    source = pretrained.base_model.encoder.layer
    if depth == len(source):
        return pretrained
    config = AutoConfig.from_pretrained(path, num_labels=2, num_hidden_layers=depth)
    model = AutoModelForSequenceClassification.from_pretrained(path, config=config, attn_implementation=attn)
    for n, layer in enumerate(model.base_model.encoder.layer):
        layer.load_state_dict(source[n % len(source)].state_dict())
    model.classifier.load_state_dict(pretrained.classifier.state_dict())
    return model


def measure(model: torch.nn.Module, batch: dict, coupling: float, bf16: bool) -> dict:
    if hasattr(model.config, "adjoint_coupling"):  # first: disable_adjoint keeps a stored coupling
        del model.config.adjoint_coupling
    disable_adjoint(model)
    model.eval()
    with torch.no_grad():
        plain = model.base_model(**batch).last_hidden_state
        enable_adjoint(model, "reversible", coupling=coupling)
        coupled = model.base_model(**batch).last_hidden_state
    model.train()
    precision = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with precision:
        report = probe_adjoint(model, batch)
    return {
        "step0": relative_error(coupled, plain),
        "rebuild": max(report.chained_errors),
        "cosine": report.grad_cosine,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="../shared/models/all-MiniLM-L6-v2")
    parser.add_argument("--data", default="../shared/data/glue/SST-2/dev.tsv")
    parser.add_argument("--depths", type=int, nargs="+", default=[6, 12, 24])
    parser.add_argument("--couplings", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.1])
    parser.add_argument("--precisions", nargs="+", default=["float32", "bf16"], choices=["float32", "bf16"])
    parser.add_argument("--sentences", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("runs/reversible_coupling"))
    args = parser.parse_args(argv)
    if any(not 0 < c <= 1 for c in args.couplings) or any(d < 1 for d in args.depths) or args.sentences < 1:
        parser.error("--couplings must lie in (0, 1], --depths and --sentences must be ≥ 1")
    lines = Path(args.data).read_text().splitlines()[1 : args.sentences + 1]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    batch = dict(tokenizer([line.split("\t")[0] for line in lines], padding=True, return_tensors="pt"))
    results = []
    for depth in args.depths:
        model = deep_pretrained(args.model, depth)
        for coupling in args.couplings:
            for precision in args.precisions:
                torch.manual_seed(0)
                row = {"depth": depth, "coupling": coupling, "precision": precision}
                row.update(measure(model, batch, coupling, precision == "bf16"))
                results.append(row)
                print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(
        args.out / "results.json",
        json.dumps({"args": vars(args) | {"out": str(args.out)}, "results": results}, indent=1),
    )
    head = "| depth | λ | precision | step-0 change (worst token) | worst rebuild error | gradient cosine |"
    rows = [head, "|---|---|---|---|---|---|"]
    for r in results:
        cosine = "–" if r["cosine"] is None else f"{r['cosine']:.6f}"
        cells = [str(r["depth"]), f"{r['coupling']:g}", r["precision"], f"{r['step0']:.2g}", f"{r['rebuild']:.2g}"]
        rows.append("| " + " | ".join([*cells, cosine]) + " |")
    text = "\n".join(rows) + "\n"
    write_text_atomic(args.out / "table.md", text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
