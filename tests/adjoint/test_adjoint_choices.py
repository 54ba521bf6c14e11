"""What the adjoint chose, readable (repr, describe) and restorable (auto_choices / restore_auto_choices)."""

from __future__ import annotations

import json

import pytest
from adjoint_helpers import loss_and_grads, ode_like, tiny_model

from sinkhorn_hf.adjoint import attach, auto_choices, describe_adjoint, enable_adjoint, restore_auto_choices


def test_stacks_and_choices_read_well():
    model, inputs = tiny_model("bert", dropout=0.0)
    assert describe_adjoint(model) == "adjoint off"
    (stack,) = enable_adjoint(model, "auto")
    assert repr(stack) == (
        "AdjointStack('encoder.layer', scheme='auto', layers=3, anchors=[], tolerance=0.01, residual_scale=1)"
    )
    assert describe_adjoint(model) == (
        "adjoint auto on encoder.layer (3 layers): not probed yet (it probes on the first batch that builds a graph)."
    )
    loss_and_grads(model, inputs)
    assert repr(stack.choice).startswith(f"AutoChoice(pass 1: anchors={stack.choice.anchors}, errors=[")
    line = describe_adjoint(model)
    assert "\n" not in line and line == stack.choice.describe("encoder.layer", 3)
    assert "anchors at layers" in line and "MiB" in line
    (euler,) = enable_adjoint(model, "euler")
    assert "not checked yet" in euler.describe()
    (checkpoint,) = enable_adjoint(model, "checkpoint")
    assert checkpoint.describe().endswith("stores every layer input (exact).") and "object at" not in repr(checkpoint)


def test_restored_choice_gives_the_same_anchors_without_probing(monkeypatch):
    model, inputs = ode_like(layers=6)  # unscaled: auto anchors some layers, rebuilds others
    (stack,) = enable_adjoint(model, "auto", tolerance=0.05, probe_every=2)
    loss_and_grads(model, inputs)
    state = json.loads(json.dumps(auto_choices(model), allow_nan=False))  # what a checkpoint stores
    assert set(state) == {"layers"} and state["layers"]["passes"] == 1
    assert 0 < len(stack.anchors) < 6

    resumed, _ = ode_like(layers=6)
    (fresh,) = enable_adjoint(resumed, "auto", tolerance=0.05, probe_every=2)
    restore_auto_choices(resumed, state)
    assert fresh.anchors == stack.anchors and fresh.choice.errors == pytest.approx(stack.choice.errors)
    probes = []
    monkeypatch.setattr(attach, "choose_anchors", lambda *a, **k: probes.append(a) or stack.choice)
    loss_and_grads(resumed, inputs)  # pass 2: not due (every 2 passes from pass 1)
    assert probes == [] and fresh.anchors == stack.anchors and fresh.passes == 2
    loss_and_grads(resumed, inputs)  # pass 3: the schedule goes on
    assert len(probes) == 1


def test_bad_restores_are_refused():
    model, inputs = tiny_model("bert", dropout=0.0)
    enable_adjoint(model, "auto")
    loss_and_grads(model, inputs)
    state = auto_choices(model)
    other, _ = tiny_model("bert", layers=2, dropout=0.0)
    with pytest.raises(ValueError, match="no adjoint stack 'encoder.layer'"):
        restore_auto_choices(other, state)
    enable_adjoint(other, "euler")
    with pytest.raises(ValueError, match="under scheme 'euler', not 'auto'"):
        restore_auto_choices(other, state)
    enable_adjoint(other, "auto")
    with pytest.raises(ValueError, match="does not fit a stack of 2 layers"):
        restore_auto_choices(other, state)
    enable_adjoint(model, "auto", tolerance=0.1)
    with pytest.raises(ValueError, match="chosen at tolerance 0.01, the stack now has 0.1"):
        restore_auto_choices(model, state)
    with pytest.raises(ValueError, match="expected"):
        restore_auto_choices(model, {"encoder.layer": {"choice": state["encoder.layer"]["choice"]}})
