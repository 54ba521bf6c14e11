"""No route of sinkhorn_attention reads a tensor back to the host: a forward+backward of every route (K=1, dense
unrolled and implicit, streaming unrolled and implicit; padded, with a bias and a tolerance) runs while every
way of synchronising (``__bool__``, ``item``, ``tolist``, ``cpu``, ``numpy``, ``__int__``/``__float__``) raises."""

import contextlib

import pytest
import torch

from sinkhorn_hf.attention import SinkhornSettings
from sinkhorn_hf.attention.routes import sinkhorn_attention

SYNCS = ("__bool__", "item", "tolist", "cpu", "numpy", "__int__", "__float__", "__index__")
ROUTES = {
    "softmax": dict(iterations=1),
    "dense-unrolled": dict(iterations=3, streaming=False),
    "dense-implicit": dict(iterations=4, streaming=False, backward="implicit"),
    "streaming-unrolled": dict(iterations=4, streaming=True, block_size=3),
    "streaming-implicit": dict(iterations=3, streaming=True, block_size=3, backward="implicit"),
    "streaming-kernel": dict(iterations=3, streaming=True, block_size=3),  # no query validity: kernel domain
}


class HostSync(AssertionError):
    pass


@contextlib.contextmanager
def no_host_sync():
    """Make every tensor-to-host read raise HostSync while inside."""
    originals = {name: getattr(torch.Tensor, name) for name in SYNCS}

    def refuse(name):
        def method(*args, **kwargs):
            raise HostSync(f"Tensor.{name} called: a host synchronisation")

        return method

    try:
        for name in SYNCS:
            setattr(torch.Tensor, name, refuse(name))
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def padded_case(n=7, lengths=(7, 5), heads=2, dim=4):
    generator = torch.Generator().manual_seed(0)
    shape = (len(lengths), heads, n, dim)
    q, k, v = (torch.randn(shape, generator=generator).requires_grad_() for _ in range(3))
    bias = torch.randn(len(lengths), 1, n, n, generator=generator).requires_grad_()
    valid = torch.arange(n)[None] < torch.tensor(lengths)[:, None]
    allowed = valid[:, None, None, :].expand(len(lengths), 1, n, n).contiguous()  # materialised, as transformers
    return (q, k, v), dict(allowed=allowed, bias=bias, query_valid=valid[:, None, :, None])


def test_the_spy_catches_a_synchronisation():
    with no_host_sync(), pytest.raises(HostSync):
        bool(torch.ones(1).all())


@pytest.mark.parametrize("tolerance", [None, 1e-3])
@pytest.mark.parametrize("route", ROUTES)
def test_forward_and_backward_never_synchronise(route, tolerance):
    tensors, masks = padded_case()
    if route == "streaming-kernel":
        masks["query_valid"] = None
    settings = SinkhornSettings(tolerance=tolerance, **ROUTES[route])
    with no_host_sync():
        out, _ = sinkhorn_attention(*tensors, **masks, settings=settings)
        grads = torch.autograd.grad(out.square().sum(), [*tensors, masks["bias"]])
    assert all(g is not None for g in grads)
    assert torch.isfinite(out).all()
