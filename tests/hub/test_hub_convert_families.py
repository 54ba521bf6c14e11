"""``sinkhorn-hf convert`` on every newer encoder family: a tiny checkpoint converted with K=1 reloads as Sinkhorn
and computes what the original computes."""

from __future__ import annotations

import torch
from tiny_models import NEW_FAMILIES, Tiny, last_hidden_state, make_tiny

from sinkhorn_hf.compat import config_attn_implementation
from sinkhorn_hf.hub.convert import convert


@torch.no_grad()
def test_convert_accepts_every_newer_family(tmp_path):
    for family in NEW_FAMILIES:
        tiny = make_tiny(family, "eager")
        tiny.model.save_pretrained(tmp_path / family)
        convert(tmp_path / family, tmp_path / f"{family}-sinkhorn", iterations=1)
        model = type(tiny.model).from_pretrained(tmp_path / f"{family}-sinkhorn").eval()
        assert config_attn_implementation(model.config) == "sinkhorn", family
        got, expected = last_hidden_state(Tiny(model, tiny.inputs, None)), last_hidden_state(tiny)
        valid = tiny.valid if tiny.valid is not None else torch.ones(got.shape[:2], dtype=torch.bool)
        torch.testing.assert_close(got[valid], expected[valid], rtol=1e-5, atol=1e-5, msg=family)
