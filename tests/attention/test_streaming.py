"""Streaming Sinkhorn attention: equal to the dense route, and no N×N tensor anywhere in forward or backward."""

import pytest
import torch
from tiny_models import make_tiny
from torch.utils._python_dispatch import TorchDispatchMode

import sinkhorn_hf.attention.routes as routes_module
import sinkhorn_hf.attention.streaming as streaming_module
from sinkhorn_hf.attention import SinkhornSettings
from sinkhorn_hf.attention.routes import sinkhorn_attention


def problem(n=40, lengths=(40, 29), heads=2, dim=8, seed=0, bias=True, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    shape = (len(lengths), heads, n, dim)
    q, k, v = (torch.randn(shape, generator=generator, dtype=dtype).requires_grad_() for _ in range(3))
    b = torch.randn(len(lengths), 1, n, n, generator=generator, dtype=dtype).requires_grad_() if bias else None
    valid = torch.arange(n)[None] < torch.tensor(lengths)[:, None]
    allowed = valid[:, None, None, :].expand(len(lengths), 1, n, n)
    return (q, k, v), dict(allowed=allowed, bias=b, query_valid=valid[:, None, :, None])


def run(tensors, masks, **settings):
    return sinkhorn_attention(*tensors, **masks, settings=SinkhornSettings(**settings))[0]


def assert_same(streamed, dense, inputs):
    """The same output and the same gradients w.r.t. ``inputs``, to float64 rounding."""
    torch.testing.assert_close(streamed, dense, rtol=0, atol=1e-12)
    upstream = torch.randn_like(dense)
    got = torch.autograd.grad((streamed * upstream).sum(), inputs)
    expected = torch.autograd.grad((dense * upstream).sum(), inputs)
    for mine, theirs in zip(got, expected, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-9 * theirs.abs().max())


# 2 and 3 end on either normalisation; 4 and 5 repeat that with one more pass each (slow). Blocks of 7 keys: several
# blocks and a partial last one (40 = 5 * 7 + 5); of 40: one block; of 1 key: the extreme, 40 blocks (slow).
SLOW = pytest.mark.slow


@pytest.mark.parametrize("iterations", [2, 3, pytest.param(4, marks=SLOW), pytest.param(5, marks=SLOW)])
@pytest.mark.parametrize("block_size", [pytest.param(1, marks=SLOW), 7, 40])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("backward", ["unrolled", "implicit"])
def test_streaming_equals_dense(iterations, block_size, with_bias, backward):
    tensors, masks = problem(bias=with_bias, seed=iterations)
    dense = run(tensors, masks, iterations=iterations, streaming=False, backward=backward)
    streamed = run(tensors, masks, iterations=iterations, streaming=True, block_size=block_size, backward=backward)
    assert_same(streamed, dense, [*tensors] + ([masks["bias"]] if with_bias else []))


@pytest.mark.parametrize("iterations", [2, 3, pytest.param(4, marks=SLOW), pytest.param(5, marks=SLOW)])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("backward", ["unrolled", "implicit"])
def test_kernel_streaming_equals_dense(iterations, padded, with_bias, backward):
    """Without query validity the streaming route works in the kernel domain (blocks of E = exp(S - m - c)); it
    equals the dense route, padded keys or not, with a bias or not."""
    tensors, masks = problem(bias=with_bias, seed=iterations)
    masks = {"allowed": masks["allowed"] if padded else None, "bias": masks["bias"]}
    calls = []
    original = streaming_module.KernelStreamingAttention.apply
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(streaming_module.KernelStreamingAttention, "apply", lambda *a: calls.append(1) or original(*a))
        streamed = run(tensors, masks, iterations=iterations, streaming=True, block_size=7, backward=backward)
    assert calls, "the kernel-domain streaming Function was not used"
    dense = run(tensors, masks, iterations=iterations, streaming=False, backward=backward)
    assert_same(streamed, dense, [*tensors] + ([masks["bias"]] if with_bias else []))


@pytest.mark.parametrize("iterations", [3, pytest.param(5, marks=SLOW)])
@pytest.mark.parametrize("block_size", [1, 3])
@pytest.mark.parametrize("side", ["right", "left"])
def test_kernel_streaming_with_padded_queries_equals_dense(iterations, block_size, side):
    """Padded queries (outside the column marginals), odd K: the kernel-domain streaming route, their own row shift
    settled block by block, equals the dense route, with blocks holding only padded rows (left padding puts them
    first, before any valid row has set the running peak of the column sums)."""
    tensors, masks = problem(bias=True, seed=block_size)
    if side == "left":
        masks = {name: mask.flip(-2) if name == "query_valid" else mask for name, mask in masks.items()}
        masks["allowed"] = masks["query_valid"].transpose(-1, -2).expand_as(masks["allowed"])
    calls = []
    original = streaming_module.KernelStreamingAttention.apply
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(streaming_module.KernelStreamingAttention, "apply", lambda *a: calls.append(1) or original(*a))
        streamed = run(tensors, masks, iterations=iterations, streaming=True, block_size=block_size)
    assert calls, "the kernel-domain streaming Function was not used"
    dense = run(tensors, masks, iterations=iterations, streaming=False)
    assert_same(streamed, dense, [*tensors, masks["bias"]])


class LargestOutput(TorchDispatchMode):
    """Records the largest tensor (in bytes) any operator returns."""

    def __init__(self):
        super().__init__()
        self.largest, self.name = 0, ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and tensor.numel() * tensor.element_size() > self.largest:
                self.largest, self.name = tensor.numel() * tensor.element_size(), str(func)
        return out


# padding as a broadcast (B, 1, N, N) view, and materialised, as transformers hands it to attention functions
@pytest.mark.parametrize("padded", [None, "broadcast", "materialised"])
@pytest.mark.parametrize("iterations", [3, 4])
def test_no_score_matrix_is_ever_materialised(iterations, padded):
    n, heads, dim = 256, 2, 8
    tensors, masks = problem(n=n, lengths=(n, 200) if padded else (n, n), heads=heads, dim=dim, bias=False)
    masks = masks if padded else {}
    if padded == "materialised":
        masks["allowed"] = masks["allowed"].contiguous()
    block_rows = routes_module.block_size_for(SinkhornSettings(streaming=True), n, n, dim)
    assert block_rows == 16
    with LargestOutput() as spy:
        out = run(tensors, masks, iterations=iterations, streaming=True)
        out.square().sum().backward()
    assert spy.largest <= 2 * heads * block_rows * n * 8, f"{spy.name} returned {spy.largest} bytes"
    # the dense route does hold score matrices (so the spy sees what it should)
    with LargestOutput() as spy:
        run(tensors, masks, iterations=iterations, streaming=False).square().sum().backward()
    assert spy.largest >= 2 * heads * n * n * 8


def test_auto_streams_above_the_threshold(monkeypatch):
    routes = []
    original = routes_module.streaming_attention
    monkeypatch.setattr(routes_module, "streaming_attention", lambda *a: routes.append("streaming") or original(*a))
    tiny = make_tiny("bert", "sinkhorn")  # padded batch of length 9
    tiny.model.config.sinkhorn_streaming_threshold = 10
    tiny.model(**tiny.inputs)
    assert routes == []
    tiny.model.config.sinkhorn_streaming_threshold = 9
    tiny.model(**tiny.inputs)
    assert routes == ["streaming"] * tiny.model.config.num_hidden_layers
