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
from sinkhorn_hf.adjoint.guard import check_rows
from sinkhorn_hf.adjoint.probe import scalar_loss
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


def _skew_rebuild_row(monkeypatch, norm: torch.nn.Module, row: int) -> None:
    """Make Euler's reverse return a finite but wrong input (row ``row`` scaled by 1.5) for the layer whose first
    LayerNorm is ``norm``."""
    original = Euler.reverse

    def reverse(self, sublayers, state, rec):
        x, *rest = original(self, sublayers, state, rec)
        if sublayers[0].norm is norm:
            x = x.clone()
            x[row] *= 1.5
        return (x, *rest)

    monkeypatch.setattr(Euler, "reverse", reverse)


def test_check_rows_take_the_smallest_token_then_evenly_spaced_rows():
    x = torch.ones(16, 5, 4)
    assert check_rows(x, 2).tolist() == [0, 15]
    assert check_rows(x, 4).tolist() == [0, 5, 10, 15]
    x[7, 3] = 0.0  # a zeroed (padded) token: its sequence is checked first
    assert check_rows(x, 2).tolist() == [0, 7] and check_rows(x, 1).tolist() == [7]
    assert check_rows(x[:3], 3) is None and check_rows(x[:2], 5) is None and check_rows(x, None) is None


def _first_layer_input(model, inputs) -> torch.Tensor:
    captured = []
    handle = model.encoder.layer[0].register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    return captured[0]


@pytest.mark.parametrize(
    ("where", "rows", "caught"), [("checked", 2, True), ("unchecked", 2, False), ("unchecked", None, True)]
)
def test_the_check_compares_a_slice_of_the_batch_and_misses_errors_outside_it(monkeypatch, where, rows, caught):
    """A wrong rebuild in a checked sequence is refused; one only in the sequence outside the slice (2 of 3 rows
    checked) passes the check: the documented limit of checking a slice."""
    model, inputs = tiny_model("bert", dropout=0.0)
    checked = check_rows(_first_layer_input(model, inputs), 2).tolist()
    row = checked[0] if where == "checked" else next(r for r in range(3) if r not in checked)
    (stack,) = enable_adjoint(model, "euler", reference_rows=rows)
    _skew_rebuild_row(monkeypatch, model.encoder.layer[1].attention.output.LayerNorm, row)
    if caught:
        with pytest.raises(InexactAdjointError, match=r"rebuilt inputs of layers \[0, 1\] are off"):
            loss_and_grads(model, inputs)
    else:
        loss_and_grads(model, inputs)
        assert max(stack.guard.errors.values()) < 1e-3


def test_non_finite_rebuild_outside_the_checked_slice_still_raises(monkeypatch):
    model, inputs = tiny_model("bert", dropout=0.0)
    (checked,) = check_rows(_first_layer_input(model, inputs), 1).tolist()
    enable_adjoint(model, "euler", reference_rows=1)  # checks one row
    original = Euler.reverse
    norm = model.encoder.layer[2].attention.output.LayerNorm

    def reverse(self, sublayers, state, rec):
        x, *rest = original(self, sublayers, state, rec)
        if sublayers[0].norm is norm:
            x = x.clone()
            x[(checked + 1) % 3, 0, 0] = math.nan
        return (x, *rest)

    monkeypatch.setattr(Euler, "reverse", reverse)
    with pytest.raises(InexactAdjointError, match=r"inputs of layers \[0, 1, 2\] are not finite"):
        loss_and_grads(model, inputs)


@pytest.mark.parametrize("scheme", ["euler", "auto"])
def test_checked_pass_keeps_exact_inputs_of_the_slice_only(scheme):
    """The checked first pass (euler) keeps, per layer, a copy of 2 of the 8 sequences; auto's probe keeps every
    layer's state on the same 2 sequences. Measured: the bytes packed for backward, and the largest tensors the
    probe's reconstruction holds, against the whole-batch check (reference_rows=None)."""
    from sinkhorn_hf.adjoint import rules

    model, _ = tiny_model("bert", layers=4, dropout=0.0)
    ids = torch.randint(3, 99, (8, 9), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def peak_state_rows(rows):
        enable_adjoint(model, scheme, reference_rows=rows)
        seen, packed = [], []
        original = rules.Euler.run

        def run(self, sublayers, state, rec):
            seen.append(state[0].shape[0])
            return original(self, sublayers, state, rec)

        rules.Euler.run = run
        try:
            with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t.nbytes) or t, lambda t: t):
                loss = scalar_loss(model(**inputs))
            loss.backward()
        finally:
            rules.Euler.run = original
        return seen, sum(packed)

    seen_slice, bytes_slice = peak_state_rows(2)
    seen_all, bytes_all = peak_state_rows(None)
    layer_input = 9 * 16 * 4  # one sequence's hidden states, float32
    if scheme == "euler":
        assert bytes_all - bytes_slice == 4 * (8 - 2) * layer_input  # 4 layers keep 2 rows instead of 8
    else:
        # the probe's 4 layers and its estimate of one layer's plain-backprop memory ran on the 2 rows, the rest on 8
        assert seen_slice.count(2) == 5 and set(seen_slice) == {2, 8} and 2 not in seen_all
