"""``sinkhorn-hf demo``: switch an encoder to Sinkhorn attention and show what changes."""

from __future__ import annotations

import argparse

import torch

from ..attention.diagnostics import marginal_report
from . import add_command

_SENTENCES = (
    "Sinkhorn attention makes every attention matrix doubly stochastic.",
    "Padding carries no mass.",
    "Rows and columns both sum to one over the valid tokens of each sentence in the batch.",
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers,
        "demo",
        run,
        help="run an encoder with softmax and with Sinkhorn attention and compare them",
        description="Run a padded batch through an encoder with SoftMax (sdpa) and with Sinkhorn attention; "
        "print per-layer row/column sums over valid tokens and how much the output changed.",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="local path or Hub name of a supported text encoder (default: a tiny random BERT built offline)",
    )
    parser.add_argument("--iterations", type=int, default=3, help="Sinkhorn iterations K (1 = SoftMax; default 3)")
    parser.add_argument("--seed", type=int, default=0)


def _tiny_bert() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=1000, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128
    )
    model = BertModel(config).eval()
    lengths = (16, 9, 24)
    input_ids = torch.randint(5, config.vocab_size, (len(lengths), max(lengths)))
    attention_mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
    return model, {"input_ids": input_ids * attention_mask, "attention_mask": attention_mask}


def _pretrained(name: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name)
    model = AutoModel.from_pretrained(name).eval()
    return model, dict(tokenizer(list(_SENTENCES), padding=True, return_tensors="pt"))


def run(args: argparse.Namespace) -> int:
    import sinkhorn_hf  # noqa: F401  (registers "sinkhorn")

    torch.manual_seed(args.seed)
    model, inputs = _tiny_bert() if args.model is None else _pretrained(args.model)
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        softmax_out = model(**inputs).last_hidden_state
        model.set_attn_implementation("sinkhorn")
        model.config.sinkhorn_iterations = args.iterations
        outputs = model(**inputs, output_attentions=True)
    report = marginal_report(outputs.attentions, valid)
    change = (outputs.last_hidden_state - softmax_out)[valid].norm() / softmax_out[valid].norm()
    name = args.model or "tiny random BERT (4 layers, 4 heads, hidden 64)"
    print(f"model: {name}; batch of {valid.shape[0]} with valid lengths {valid.sum(-1).tolist()}")
    print(f"sinkhorn iterations K={args.iterations} (rows exact for odd K; columns converge as K grows)\n")
    print("layer  max|row sum-1|  max|col sum-1|  std(col sums)")
    for row in report.summary():
        print(f"{row['layer']:>5}  {row['row_error']:>14.2e}  {row['column_error']:>14.2e}  {row['column_std']:>13.2e}")
    print(f"\nrelative change of the last hidden state vs softmax (valid tokens): {change:.3e}")
    return 0
