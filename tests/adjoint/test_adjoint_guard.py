"""Rebuilding schemes check themselves: wrong or non-finite rebuilt inputs raise (or warn once when allowed),
and the probe reports non-finite gradients as such."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from adjoint_helpers import loss_and_grads, ode_like, rel_error, tiny_model

from sinkhorn_hf.adjoint import InexactAdjointError, enable_adjoint, probe_adjoint
from sinkhorn_hf.adjoint.rules import Euler


def _listed_errors(message: str) -> dict[int, float]:
    return {int(n): float(e) for n, e in re.findall(r"layer (\d+): ([-+.e\d]+|inf|nan)", message)}


def test_inexact_rebuild_is_refused_naming_layers_and_errors():
    model, inputs = ode_like(layers=4)  # no residual scale: rebuilt inputs off by 2-10 %
    model.eval()  # no dropout: the probe's measurement below is of the very same rebuild
    reference = probe_adjoint(model, inputs).chained_errors
    (stack,) = enable_adjoint(model, "euler", tolerance=0.05)
    with pytest.raises(InexactAdjointError, match=r"rebuilt inputs of layers \[0, 1\] are off by more than 0.05") as e:
        loss_and_grads(model, inputs)
    message = str(e.value)
    assert "scheme='auto'" in message and "scheme='checkpoint'" in message and "allow_inexact=True" in message
    listed = _listed_errors(message)
    assert sorted(listed) == [0, 1, 2, 3]
    for n, error in enumerate(reference):
        assert listed[n] == pytest.approx(error, rel=0.05)  # printed with two significant digits
        assert stack.guard.errors[n] == pytest.approx(error, rel=1e-4)
    assert [n for n, error in enumerate(reference) if error > 0.05] == [0, 1]


def test_allow_inexact_warns_once_and_returns_the_adjoint_gradients():
    model, inputs = ode_like(layers=4)
    _, exact = loss_and_grads(model, inputs)
    (stack,) = enable_adjoint(model, "euler", probe_every=1, allow_inexact=True)
    with pytest.warns(RuntimeWarning) as caught:
        runs = [loss_and_grads(model, inputs)[1] for _ in range(3)]  # every pass is checked, one warning
    assert len(caught) == 1 and "allow_inexact=True" in str(caught[0].message)
    assert stack.guard.checked_pass == 3
    for grads in runs:
        assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)
        assert rel_error(grads, exact) > 1e-2  # the inexact gradients, as asked
        torch.testing.assert_close(grads, runs[0])


def test_smooth_scaled_stack_passes_its_check():
    model, inputs = ode_like(layers=8)
    enable_adjoint(model, "off", residual_scale="1/L")
    _, exact = loss_and_grads(model, inputs)
    (stack,) = enable_adjoint(model, "euler")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, grads = loss_and_grads(model, inputs)
    assert stack.guard.checked_pass == 1 and sorted(stack.guard.errors) == list(range(8))
    assert max(stack.guard.errors.values()) < 1e-2
    assert rel_error(grads, exact) < 1e-2
    assert "rebuild errors [" in stack.describe() and "at pass 1" in stack.describe()


def _poison_rebuild(monkeypatch, norm: torch.nn.Module, value: float) -> None:
    """Make Euler's reverse put ``value`` into the rebuilt input of the layer whose first LayerNorm is ``norm``."""
    original = Euler.reverse

    def reverse(self, sublayers, state, rec):
        x, *rest = original(self, sublayers, state, rec)
        if sublayers[0].norm is norm:
            x = x.clone()
            x[0, 0, 0] = value
        return (x, *rest)

    monkeypatch.setattr(Euler, "reverse", reverse)


@pytest.mark.parametrize("scheme", ["euler", "auto"])
def test_non_finite_rebuild_raises_in_any_backward_naming_the_layer(monkeypatch, scheme):
    model, inputs = tiny_model("bert", dropout=0.0)
    (stack,) = enable_adjoint(model, scheme, allow_inexact=True)
    loss_and_grads(model, inputs)  # the checked first pass (euler) / the probe (auto) see a healthy rebuild
    _poison_rebuild(monkeypatch, model.encoder.layer[1].attention.output.LayerNorm, math.inf)
    with pytest.raises(InexactAdjointError, match=r"inputs of layers \[0, 1\] are not finite .*starting at layer 1"):
        loss_and_grads(model, inputs)
    assert stack.passes == 2


def test_auto_anchors_layers_whose_rebuild_is_nan(monkeypatch):
    model, inputs = tiny_model("bert", dropout=0.0)
    _, exact = loss_and_grads(model, inputs)
    _poison_rebuild(monkeypatch, model.encoder.layer[2].attention.output.LayerNorm, math.nan)
    (stack,) = enable_adjoint(model, "auto")
    _, grads = loss_and_grads(model, inputs)
    assert 2 in stack.anchors and math.isnan(stack.choice.errors[2])
    assert rel_error(grads, exact) < 1e-2


def test_probe_reports_non_finite_gradients(monkeypatch):
    model, inputs = tiny_model("bert", dropout=0.0)
    healthy = probe_adjoint(model, inputs)
    assert healthy.finite and healthy.nonfinite_fraction == 0.0 and healthy.grad_cosine > 0.999
    _poison_rebuild(monkeypatch, model.encoder.layer[1].attention.output.LayerNorm, math.inf)
    report = probe_adjoint(model, inputs)
    assert not report.finite and 0.0 < report.nonfinite_fraction < 1.0
    for value in (report.grad_cosine, report.grad_rel_error):  # on the finite entries, never NaN
        assert value is None or math.isfinite(value)
    assert -1.0 <= report.grad_cosine <= 1.0


@pytest.mark.parametrize("attn", ["sdpa", "sinkhorn"])
def test_pretrained_minilm_euler_raises_instead_of_wrong_gradients(minilm_path, attn):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import sinkhorn_hf  # noqa: F401  (registers attn_implementation="sinkhorn")

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path, attn_implementation=attn).train()
    batch = dict(
        tokenizer(["a gripping, beautifully shot film", "dull and far too long"], padding=True, return_tensors="pt")
    )
    batch["labels"] = torch.tensor([1, 0])
    enable_adjoint(model, "euler")
    # Rebuilt inputs blow up downwards; where the blow-up overflows (it is chaotic: the last rounding of the
    # attention decides) the guard's non-finite refusal fires instead of the inexact one. Either way it raises.
    refusal = r"layers \[0, 1, 2, 3, 4, 5\] are off|rebuilt inputs of layers \[0(, \d)*\] are not finite"
    with pytest.raises(InexactAdjointError, match=refusal) as e:
        model(**batch).loss.backward()
    errors = _listed_errors(str(e.value))
    assert sorted(errors) == list(range(6)) and not any(error <= 1.0 for error in errors.values())  # O(1) and worse
    assert all(p.grad is None for p in model.bert.embeddings.parameters())  # raised before reaching them
