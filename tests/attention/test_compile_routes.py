"""``torch.compile(fullgraph=True)`` of sinkhorn_attention on every route: one graph (no break, so no host
synchronisation or data-dependent branch either), forward and forward+backward equal to eager within 1e-5.
Compiling with inductor takes 5 s to minutes on a small CPU, so all are marked slow (test_compile_models keeps a
fullgraph trace of a whole model in the fast suite)."""

import pytest
import torch

from sinkhorn_hf.attention import SinkhornSettings
from sinkhorn_hf.attention.routes import sinkhorn_attention

ROUTES = {
    "softmax": dict(iterations=1),
    "dense": dict(iterations=3, streaming=False),
    "streaming": dict(iterations=4, streaming=True, block_size=3),
    "streaming-kernel": dict(iterations=3, streaming=True, block_size=3),  # no query validity: kernel domain
    "streaming-kernel-padded": dict(iterations=3, streaming=True, block_size=3),  # odd K: kernel domain too
}
CASES = [
    pytest.param(route, train, id=f"{route}-{'train' if train else 'forward'}", marks=pytest.mark.slow)
    for route in ROUTES
    for train in (False, True)
]


def padded_inputs():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 7, 4, generator=generator).requires_grad_() for _ in range(3))
    valid = torch.arange(7)[None] < torch.tensor([7, 5])[:, None]
    return (q, k, v), valid[:, None, None, :].expand(2, 1, 7, 7), valid[:, None, :, None]


@pytest.mark.parametrize(("route", "train"), CASES)
def test_fullgraph_compile_equals_eager(route, train):
    settings = SinkhornSettings(**ROUTES[route])

    def attention(q, k, v, allowed, query_valid):
        return sinkhorn_attention(q, k, v, allowed=allowed, query_valid=query_valid, settings=settings)[0]

    tensors, allowed, valid = padded_inputs()
    valid = None if route == "streaming-kernel" else valid
    compiled = torch.compile(attention, fullgraph=True)
    torch._dynamo.reset()
    # the streaming backward differentiates its inner SDPA call with torch.autograd.grad
    with torch._dynamo.config.patch(trace_autograd_ops=True), torch.set_grad_enabled(train):
        out = compiled(*tensors, allowed, valid)
    expected = attention(*tensors, allowed, valid)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    if train:
        got = torch.autograd.grad(out.square().sum(), tensors)
        wanted = torch.autograd.grad(expected.square().sum(), tensors)
        for mine, theirs in zip(got, wanted, strict=True):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_compiled_dense_route_exponentiates_the_scores_once():
    """Inductor lowers a one-row matrix product on CPU to a multiply-and-sum and fuses it with its input's producer:
    each half-step's product with E would recompute exp over all N² scores. The route keeps them matrix products
    (a zero second row), so the generated forward exponentiates the scores in one loop."""
    from torch._inductor.utils import run_and_get_code

    settings = SinkhornSettings(iterations=3, streaming=False)
    q, k, v = (torch.randn(2, 2, 32, 4) for _ in range(3))
    compiled = torch.compile(lambda q, k, v: sinkhorn_attention(q, k, v, settings=settings)[0], fullgraph=True)
    with torch.no_grad():
        out, (code, *_) = run_and_get_code(compiled, q, k, v)
    torch.testing.assert_close(out, sinkhorn_attention(q, k, v, settings=settings)[0], rtol=1e-5, atol=1e-5)
    # one loop over the scores (and at most its scalar tail); per half-step recomputation made it 4 and more
    assert code.count(".exp2(") <= 2, code
