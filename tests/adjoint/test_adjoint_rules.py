"""The forward and reverse rules against hand-computed values, and the registry of their names."""

from __future__ import annotations

import torch

from sinkhorn_hf.adjoint import SCHEMES, Sublayer
from sinkhorn_hf.adjoint.rules import RULES, Checkpoint, Euler, Heun, Momentum

f64 = torch.float64


def _linear(a: torch.Tensor) -> Sublayer:
    return Sublayer(lambda x: x @ a.T)


def test_euler_and_heun_rules_by_hand():
    g = torch.Generator().manual_seed(0)
    a, x, s = torch.randn(4, 4, generator=g, dtype=f64), torch.randn(3, 4, generator=g, dtype=f64), 0.3
    for rule in (Euler(scale=s), Heun(scale=s)):
        record = rule.new_record(x, training=False)
        (z,) = rule.run([_linear(a)], (x,), record)
        (back,) = rule.reverse([_linear(a)], (z,), record)
        ax = x @ a.T
        if isinstance(rule, Euler):
            torch.testing.assert_close(z, x + s * ax)
            torch.testing.assert_close(back, z - s * z @ a.T)
        else:  # z = x + ½[f(x) + f(x + f(x))], f = s·A
            torch.testing.assert_close(z, x + 0.5 * (s * ax + s * (x + s * ax) @ a.T))
            k2 = s * z @ a.T
            torch.testing.assert_close(back, z - 0.5 * (k2 + s * (z - k2) @ a.T))


def test_layernorm_is_undone_with_stored_statistics():
    g = torch.Generator().manual_seed(1)
    norm = torch.nn.LayerNorm(6, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(6, generator=g, dtype=f64) + 0.5)
        norm.bias.copy_(torch.randn(6, generator=g, dtype=f64))
    x = 3.0 * torch.randn(2, 5, 6, generator=g, dtype=f64) + 1.0
    sublayers, rule = [Sublayer(torch.zeros_like, norm)], Euler()  # y = LN(x + 0): the reverse must give x back
    record = rule.new_record(x, training=False)
    (y,) = rule.run(sublayers, (x,), record)
    torch.testing.assert_close(rule.reverse(sublayers, (y,), record)[0], x, rtol=1e-12, atol=1e-12)


def test_momentum_is_exactly_invertible():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(4, 4, generator=g, dtype=f64)
    sublayers, rule = [Sublayer(lambda x: torch.tanh(x @ a.T))], Momentum(momentum=0.8)
    x, v = torch.randn(3, 4, generator=g, dtype=f64), torch.randn(3, 4, generator=g, dtype=f64)
    record = rule.new_record(x, training=False)
    x1, v1 = rule.run(sublayers, (x, v), record)
    assert not torch.allclose(x1, x)
    back_x, back_v = rule.reverse(sublayers, (x1, v1), record)
    torch.testing.assert_close(back_x, x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(back_v, v, rtol=1e-12, atol=1e-12)


def test_random_branches_are_replayed_in_reverse():
    # f(x) = 0.1·u with fresh uniform noise u per call: z − f(z) gives x back only if the reverse sees the same u.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, generator=g, dtype=f64)
    sublayers = [Sublayer(lambda t: 0.1 * torch.rand_like(t)), Sublayer(lambda t: 0.1 * torch.rand_like(t))]
    for rule in (Euler(), Heun()):
        record = rule.new_record(x, training=True)
        (z,) = rule.run(sublayers, (x,), record)
        assert len(record.rng) == len(sublayers) * (2 if isinstance(rule, Heun) else 1)
        torch.testing.assert_close(rule.reverse(sublayers, (z,), record)[0], x, rtol=0, atol=1e-15)


def test_registry_names_every_rule_and_the_policies_are_not_rules():
    assert set(RULES) == set(SCHEMES) - {"auto", "off"}
    assert Checkpoint.stores_every_input and not any(RULES[n].stores_every_input for n in RULES if n != "checkpoint")
    x = torch.ones(2, 3)
    assert [t.tolist() for t in Momentum().start(x)] == [x.tolist(), torch.zeros(2, 3).tolist()]
    assert len(Euler().start(x)) == 1 and not Momentum().new_record(x, training=False).recording_stats
