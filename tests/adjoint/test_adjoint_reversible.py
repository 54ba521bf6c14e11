"""scheme="reversible": the two-stream coupling x' = L(x) + λp, p' = x, its exact inverse, gradients against exact
backprop of the same model, save/reload, and why it cannot start exactly at the pretrained function."""

from __future__ import annotations

import pytest
import torch
import transformers
from adjoint_helpers import loss_and_grads, rel_error, script_module, tiny_model, unit_scale_stream

from sinkhorn_hf.adjoint import InexactAdjointError, adjoint_stacks, disable_adjoint, enable_adjoint, probe_adjoint
from sinkhorn_hf.adjoint.layer_views import Sublayer, find_stacks
from sinkhorn_hf.adjoint.rules import Reversible

f64 = torch.float64


def test_reversible_rule_is_exactly_invertible():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(4, 4, generator=g, dtype=f64)
    sublayers, rule = [Sublayer(lambda x: torch.tanh(x @ a.T))], Reversible(coupling=0.5)
    x, p = torch.randn(3, 4, generator=g, dtype=f64), torch.randn(3, 4, generator=g, dtype=f64)
    record = rule.new_record(x, training=False)
    x1, p1 = rule.run(sublayers, (x, p), record)
    torch.testing.assert_close(x1, x + torch.tanh(x @ a.T) + 0.5 * p)  # the layer is x + tanh(ax) here
    torch.testing.assert_close(p1, x)
    back_x, back_p = rule.reverse(sublayers, (x1, p1), record)
    torch.testing.assert_close(back_x, x, rtol=0, atol=0)
    torch.testing.assert_close(back_p, p, rtol=1e-12, atol=1e-12)
    assert torch.equal(rule.start(x)[1], torch.zeros_like(x))  # p = 0 below the bottom layer


def _stack_output(model, inputs) -> torch.Tensor:
    captured = []
    last_layer = find_stacks(model)[0].positions[-1]
    handle = last_layer.register_forward_hook(lambda m, a, out: captured.append(out))
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    return captured[0]


def _coupled_by_hand(model, inputs, coupling: float) -> torch.Tensor:
    """The reversible stack's output computed from the plain model's own layers: x' = layer(x) + λp, p' = x."""
    disable_adjoint(model)
    calls = []
    layers = find_stacks(model)[0].positions
    handle = layers[0].register_forward_pre_hook(lambda m, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    (x, *rest), kwargs = calls[0]
    p = torch.zeros_like(x)
    with torch.no_grad():
        for layer in layers:
            x, p = layer(x, *rest, **kwargs) + coupling * p, x
    return x


@pytest.mark.parametrize("model_type", ["bert", "vit"])
def test_forward_is_the_coupling_and_gradients_match_exact_backprop(model_type):
    model, inputs = tiny_model(model_type, layers=4, dropout=0.1)  # dropout: masks replayed in the rebuild
    unit_scale_stream(model)
    model.eval()
    expected = _coupled_by_hand(model, inputs, 0.5)
    enable_adjoint(model, "reversible", coupling=0.5)
    torch.testing.assert_close(_stack_output(model, inputs), expected)
    model.train()
    report = probe_adjoint(model, inputs)
    assert report.grad_cosine > 0.99999 and report.grad_rel_error < 1e-4
    assert max(report.chained_errors) < 1e-4
    (stack,) = adjoint_stacks(model)
    loss_and_grads(model, inputs)  # the guard's checked pass
    assert stack.guard.checked_pass is not None and max(stack.guard.errors.values()) < 1e-4


def test_small_coupling_tends_to_the_pretrained_function_but_cannot_be_rebuilt():
    """The price of an invertible coupling: the change of function at step 0 is ∝ λ, the rebuild error ∝ 1/λ per
    layer. No λ gives both a 1e-5 start and a rebuild within tolerance (docs/adjoint.md)."""
    model, inputs = tiny_model("bert", layers=4, dropout=0.0)
    model.eval()
    with torch.no_grad():
        plain = model(**inputs).last_hidden_state
    deviations = {}
    for coupling in (1e-2, 1e-4):
        enable_adjoint(model, "reversible", coupling=coupling)
        with torch.no_grad():
            deviations[coupling] = float((model(**inputs).last_hidden_state - plain).norm() / plain.norm())
    assert deviations[1e-4] < deviations[1e-2] / 50  # linear in λ
    assert deviations[1e-4] < 1e-3
    model.train()
    with pytest.raises(InexactAdjointError, match="are off by more than"):
        loss_and_grads(model, inputs)  # λ = 1e-4: the reverse divides rounding errors by 1e-4 per layer


def test_coupling_survives_save_and_load_and_other_schemes_are_refused(tmp_path):
    model, inputs = tiny_model("bert", layers=3, dropout=0.0)
    model.eval()
    enable_adjoint(model, "reversible", coupling=0.25)
    with torch.no_grad():
        expected = model(**inputs).last_hidden_state
    assert model.config.adjoint_coupling == 0.25
    model.save_pretrained(tmp_path)
    reloaded = transformers.BertModel.from_pretrained(tmp_path).eval()  # no enable_adjoint: the coupling is on
    (stack,) = adjoint_stacks(reloaded)
    assert stack.scheme == "off" and isinstance(stack.rule, Reversible) and stack.rule.coupling == 0.25
    torch.testing.assert_close(reloaded(**inputs).last_hidden_state, expected)
    enable_adjoint(reloaded, "reversible")  # the stored λ
    torch.testing.assert_close(reloaded(**inputs).last_hidden_state, expected)
    disable_adjoint(reloaded)  # plain backprop of the same coupled function
    torch.testing.assert_close(reloaded(**inputs).last_hidden_state, expected)
    with pytest.raises(ValueError, match=r"runs a reversible coupling .*scheme 'checkpoint' would train a different"):
        enable_adjoint(reloaded, "checkpoint")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scheme": "euler", "coupling": 0.5}, "coupling applies to scheme='reversible' only"),
        ({"scheme": "reversible", "coupling": 0.0}, r"coupling must lie in \(0, 1\]"),
        ({"scheme": "reversible", "coupling": 1.5}, r"coupling must lie in \(0, 1\]"),
    ],
)
def test_bad_coupling_is_refused(kwargs, message):
    model, _ = tiny_model("bert")
    with pytest.raises(ValueError, match=message):
        enable_adjoint(model, **kwargs)


def test_reversible_composes_with_lora():
    from peft import LoraConfig, get_peft_model

    model, inputs = tiny_model("bert", layers=3, dropout=0.0)
    enable_adjoint(model, "off")
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["query", "value"], init_lora_weights=False))
    enable_adjoint(model, "reversible", coupling=0.5)
    _, grads = loss_and_grads(model, inputs)
    (stack,) = adjoint_stacks(model)
    with stack.storing_every_input():
        _, exact = loss_and_grads(model, inputs)
    lora = {n: g for n, g in exact.items() if "lora_" in n}
    assert lora and all(g is not None for g in lora.values())
    assert all(grads[n] is None for n, g in exact.items() if g is None)  # frozen weights get no gradient
    assert rel_error(grads, exact) < 1e-4


def _minilm(path, layers: int, attn: str = "sdpa"):
    """The pretrained MiniLM, or a BERT of ``layers`` layers built from its config with its 6 pretrained layers
    repeated (scripts/reversible_coupling.py), in train mode, with a two-sentence batch and labels."""
    from transformers import AutoTokenizer

    import sinkhorn_hf  # noqa: F401  (registers attn_implementation="sinkhorn")

    torch.manual_seed(0)
    model = script_module("reversible_coupling").deep_pretrained(str(path), layers, attn)
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = dict(
        tokenizer(["a gripping, beautifully shot film", "dull and far too long"], padding=True, return_tensors="pt")
    )
    batch["labels"] = torch.tensor([1, 0])
    return model.train(), batch


@pytest.mark.parametrize(
    ("layers", "attn"),
    [
        (6, "sdpa"),
        pytest.param(6, "sinkhorn", marks=pytest.mark.slow),
        pytest.param(24, "sdpa", marks=pytest.mark.slow),
    ],
)
def test_pretrained_minilm_gradients_match_exact_backprop_of_the_coupled_model(minilm_path, layers, attn):
    model, batch = _minilm(minilm_path, layers, attn)
    (stack,) = enable_adjoint(model, "reversible")  # the default coupling, guard on (no allow_inexact)
    report = probe_adjoint(model, batch)
    assert report.finite and report.grad_cosine >= 0.9999
    model(**batch).loss.backward()  # the guard's checked pass: raises if a rebuilt input is off
    assert max(stack.guard.errors.values()) <= 1e-2
    assert all(p.grad is not None for p in model.bert.embeddings.parameters() if p.requires_grad)


def test_trainer_flags_build_a_reversible_model(tmp_path):
    from transformers import AutoModelForSequenceClassification, HfArgumentParser

    from sinkhorn_hf.training.arguments import ModelArguments
    from sinkhorn_hf.training.modeling import build_model, load_config

    model, _ = tiny_model("bert", layers=2)
    model.save_pretrained(tmp_path)
    flags = ["--model_name_or_path", str(tmp_path), "--adjoint", "reversible", "--adjoint_coupling", "0.5"]
    (model_args,) = HfArgumentParser(ModelArguments).parse_args_into_dataclasses(flags)
    built, _ = build_model(model_args, load_config(model_args, num_labels=2), AutoModelForSequenceClassification)
    (stack,) = adjoint_stacks(built)
    assert stack.scheme == "reversible" and stack.rule.coupling == 0.5 and built.config.adjoint_coupling == 0.5
    flags[3] = "euler"
    (model_args,) = HfArgumentParser(ModelArguments).parse_args_into_dataclasses(flags)
    with pytest.raises(ValueError, match="coupling applies to scheme='reversible' only"):
        build_model(model_args, load_config(model_args, num_labels=2), AutoModelForSequenceClassification)
