"""The real pretrained MiniLM BERT (offline, from ../shared) with Sinkhorn attention."""

import torch
import transformers

import sinkhorn_hf  # noqa: F401
from sinkhorn_hf.attention.diagnostics import marginal_report, softmax_marginals
from sinkhorn_hf.compat import config_attn_implementation

SENTENCES = ["A real sentence about doubly stochastic attention.", "Short one.", "Padding must not matter here."]


@torch.no_grad()
def test_minilm_runs_with_sinkhorn(minilm_path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path)
    inputs = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    valid = inputs["attention_mask"].bool()
    model = transformers.AutoModel.from_pretrained(minilm_path, attn_implementation="sinkhorn").eval()
    assert config_attn_implementation(model.config) == "sinkhorn"
    reference = transformers.AutoModel.from_pretrained(minilm_path, attn_implementation="sdpa").eval()

    model.config.sinkhorn_iterations = 1
    torch.testing.assert_close(
        model(**inputs).last_hidden_state[valid], reference(**inputs).last_hidden_state[valid], rtol=1e-4, atol=1e-4
    )
    # pretrained attention is peaked, so Sinkhorn needs many steps (column error 0.08 at K=41, 0.01 at K=201)
    model.config.sinkhorn_iterations = 201
    out = model(**inputs, output_attentions=True)
    assert torch.isfinite(out.last_hidden_state).all()
    report = marginal_report(out.attentions, valid)
    assert report.row_error.max() < 1e-5 and report.column_error.max() < 2e-2
    # pretrained softmax attention is far from doubly stochastic: Sinkhorn changes the function
    assert softmax_marginals(reference, **inputs).column_error.mean() > 0.1
